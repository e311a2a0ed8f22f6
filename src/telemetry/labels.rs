//! Bounded label values: a client cannot grow the number of series.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

/// Label value for requests that name no model (or whose body could not be read as JSON).
pub const MODEL_NONE: &str = "none";
/// Label value for model names that are not known to the proxy.
pub const MODEL_OTHER: &str = "other";

/// The set of model names allowed as label values: the configured ones plus those the upstream
/// lists, never more than a fixed number, so clients cannot grow the number of series.
#[derive(Debug)]
pub struct ModelLabels {
    known: RwLock<HashMap<Box<str>, Arc<str>>>,
    max: usize,
    other: Arc<str>,
    none: Arc<str>,
}

impl ModelLabels {
    /// Starts with the configured names (up to `max`).
    pub fn new(configured: &[String], max: usize) -> Self {
        let labels = ModelLabels {
            known: RwLock::new(HashMap::new()),
            max,
            other: Arc::from(MODEL_OTHER),
            none: Arc::from(MODEL_NONE),
        };
        labels.extend(configured.iter().map(String::as_str));
        labels
    }

    /// Allows more names (from the upstream's `/v1/models`), as long as there is room.
    pub fn extend<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
        for name in names {
            if known.len() >= self.max {
                break;
            }
            if !known.contains_key(name) {
                known.insert(name.into(), Arc::from(name));
            }
        }
    }

    /// The label value for a request's `model`.
    pub fn label(&self, model: Option<&str>) -> Arc<str> {
        let Some(model) = model else {
            return self.none.clone();
        };
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
        known
            .get(model)
            .cloned()
            .unwrap_or_else(|| self.other.clone())
    }
}

/// Label value for requests without the tenant header (or with an empty one).
pub const TENANT_NONE: &str = "none";
/// Label value for tenants beyond `telemetry.max_tenants`, and for header values that cannot be
/// a label (too long, or with characters other than printable ASCII).
pub const TENANT_OTHER: &str = "other";
pub use crate::config::{MAX_TENANT_LEN, valid_tenant};

/// The `tenant` label values: the allow-list (`telemetry.tenants`) always has its own, then the
/// first header values seen take the slots left up to `telemetry.max_tenants`; any later value
/// is `other`, and a request without the header `none`. So at most `max_tenants + 2` values
/// exist, whatever clients send, and one client cannot take the allow-listed tenants' labels.
///
/// A slot, once taken, is kept for the life of the process: a series that vanished and came
/// back under another tenant would break every `rate()` over it.
#[derive(Debug)]
pub struct TenantLabels {
    header: http::HeaderName,
    known: RwLock<HashMap<Box<str>, Arc<str>>>,
    max: usize,
    other: Arc<str>,
    none: Arc<str>,
}

impl TenantLabels {
    /// Reads the tenant from `header`; `allowed` (at most `max` names, checked by config
    /// validation) have their labels from the start.
    pub fn new(header: http::HeaderName, allowed: &[String], max: usize) -> Self {
        let known = allowed
            .iter()
            .filter(|name| valid_tenant(name))
            .map(|name| (Box::from(name.as_str()), Arc::from(name.as_str())))
            .collect();
        TenantLabels {
            header,
            known: RwLock::new(known),
            max: max.max(allowed.len()),
            other: Arc::from(TENANT_OTHER),
            none: Arc::from(TENANT_NONE),
        }
    }

    /// The header the tenant is read from.
    pub fn header(&self) -> &http::HeaderName {
        &self.header
    }

    /// The label of a request with `headers`, taken when the request arrives: its tenant
    /// header's value (the first, if it came more than once) if that value has or gets a
    /// slot, else `other`; `none` without the header. Surrounding spaces are not part of the
    /// value.
    pub fn label(&self, headers: &http::HeaderMap) -> Arc<str> {
        let Some(value) = headers.get(&self.header) else {
            return self.none.clone();
        };
        let Ok(value) = value.to_str() else {
            return self.other.clone();
        };
        let value = value.trim_matches([' ', '\t']);
        if value.is_empty() {
            return self.none.clone();
        }
        if !valid_tenant(value) {
            return self.other.clone();
        }
        if let Some(label) = self
            .known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(value)
        {
            return label.clone();
        }
        let mut known = self.known.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(label) = known.get(value) {
            return label.clone();
        }
        if known.len() >= self.max || value == TENANT_OTHER || value == TENANT_NONE {
            return self.other.clone();
        }
        let label: Arc<str> = Arc::from(value);
        known.insert(value.into(), label.clone());
        label
    }

    /// The label `name` is counted under now, without taking a slot: its own if it has one,
    /// `none` or `other` for those names, else `other`. For `/stats?tenant=`.
    pub fn lookup(&self, name: &str) -> Arc<str> {
        match name {
            TENANT_NONE => return self.none.clone(),
            TENANT_OTHER => return self.other.clone(),
            _ => {}
        }
        self.known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.other.clone())
    }

    /// The `none` label value.
    pub fn none(&self) -> Arc<str> {
        self.none.clone()
    }

    /// How many tenants have their own label value now (`other` and `none` not counted).
    pub fn len(&self) -> usize {
        self.known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// No tenant has its own label value yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
