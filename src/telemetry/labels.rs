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
