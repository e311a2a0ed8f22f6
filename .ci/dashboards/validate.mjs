// Validates every Grafana dashboard in grafana/dashboards/:
//  1. against the JSON Schema generated (with ts-json-schema-generator) from the `Dashboard` type
//     that the installed @grafana/schema package publishes (raw/dashboard/x/types.gen.d.ts);
//  2. against this repository's rules: unique dashboard uids, unique panel ids, no hard-coded
//     datasource uid (only the ${datasource} variable), a description on every panel, and queries
//     that use only known metrics (grafana/metrics.txt, vllm:*, up, recording rules from
//     config/prometheus/rules/*.yml) and only the variables $model, $endpoint, $tenant, $upstream,
//     $__rate_interval.
//
// Usage: npm ci --prefix .ci/dashboards && node .ci/dashboards/validate.mjs [dashboard.json ...]
// Exit code 0 when everything is valid, 1 otherwise (each problem printed on its own line).
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { createGenerator } from "ts-json-schema-generator";
import Ajv from "ajv";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..", "..");
const require = createRequire(import.meta.url);

const schemaPkg = dirname(require.resolve("@grafana/schema/package.json"));
const schemaVersion = JSON.parse(readFileSync(join(schemaPkg, "package.json"), "utf8")).version;
const typesFile = join(schemaPkg, "dist", "types", "raw", "dashboard", "x", "types.gen.d.ts");

const schema = createGenerator({
  path: typesFile,
  type: "Dashboard",
  skipTypeCheck: true,
  expose: "export",
  topRef: true,
  jsDoc: "basic",
  additionalProperties: false,
}).createSchema("Dashboard");
if (process.env.DASHBOARD_SCHEMA_OUT) {
  writeFileSync(process.env.DASHBOARD_SCHEMA_OUT, JSON.stringify(schema, null, 2));
}
const ajv = new Ajv({ allErrors: true, strict: false });
const validateSchema = ajv.compile(schema);

// ---------- known names ----------
const allowedMetrics = new Set(["up"]);
for (const line of readFileSync(join(root, "grafana", "metrics.txt"), "utf8").split("\n")) {
  const t = line.trim();
  if (!t || t.startsWith("#")) continue;
  const [name, kind] = t.split(/\s+/);
  allowedMetrics.add(name);
  if (kind === "histogram") for (const s of ["_bucket", "_sum", "_count"]) allowedMetrics.add(name + s);
}
const rulesDir = join(root, "config", "prometheus", "rules");
for (const f of readdirSync(rulesDir).filter((f) => f.endsWith(".yml") || f.endsWith(".yaml"))) {
  for (const m of readFileSync(join(rulesDir, f), "utf8").matchAll(/^\s*-?\s*record:\s*["']?([A-Za-z_:][A-Za-z0-9_:]*)/gm)) {
    allowedMetrics.add(m[1]);
  }
}
const allowedVars = new Set(["$model", "$endpoint", "$tenant", "$upstream", "$__rate_interval"]);
const keywords = new Set(["by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"]);

/** Metric names a PromQL expression selects (strings, label matchers, ranges and grouping lists removed). */
export function metricNames(expr) {
  let s = expr.replace(/"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`/g, '""');
  s = s.replace(/\{[^{}]*\}/g, " ").replace(/\[[^\]]*\]/g, " ");
  s = s.replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, " ");
  const names = [];
  const re = /(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|\.\d+)|([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?/g;
  for (const m of s.matchAll(re)) {
    if (m[1] !== undefined) continue; // a number
    const id = m[2];
    if (m[3] || keywords.has(id.toLowerCase())) continue; // a function call or a keyword
    names.push(id);
  }
  return names;
}

function* walk(value, path = "$") {
  yield [path, value];
  if (value && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) yield* walk(v, `${path}.${k}`);
  }
}

function flatPanels(panels) {
  const out = [];
  for (const p of panels ?? []) {
    out.push(p);
    if (Array.isArray(p.panels)) out.push(...flatPanels(p.panels));
  }
  return out;
}

export function checkDashboard(d) {
  const problems = [];
  const panels = flatPanels(d.panels);
  const ids = new Map();
  for (const p of panels) {
    if (typeof p.id !== "number") problems.push(`panel "${p.title}" has no numeric id`);
    else if (ids.has(p.id)) problems.push(`panel id ${p.id} is used by "${ids.get(p.id)}" and "${p.title}"`);
    else ids.set(p.id, p.title);
    if (p.type !== "row" && !(typeof p.description === "string" && p.description.trim())) {
      problems.push(`panel "${p.title}" has no description`);
    }
    if (p.type !== "row" && !(p.targets ?? []).length) problems.push(`panel "${p.title}" has no query`);
    for (const t of p.targets ?? []) {
      if (typeof t.expr !== "string" || !t.expr.trim()) {
        problems.push(`panel "${p.title}" query ${t.refId}: no plain expr string`);
        continue;
      }
      for (const v of t.expr.match(/\$\{?[A-Za-z_][A-Za-z0-9_]*\}?/g) ?? []) {
        if (!allowedVars.has(v)) problems.push(`panel "${p.title}" query ${t.refId}: variable ${v} is not one of ${[...allowedVars].join(", ")}`);
      }
      for (const name of metricNames(t.expr)) {
        if (!allowedMetrics.has(name) && !name.startsWith("vllm:")) {
          problems.push(`panel "${p.title}" query ${t.refId}: unknown metric ${name}`);
        }
      }
    }
  }
  for (const [path, v] of walk(d)) {
    if (path.endsWith(".datasource") && v && typeof v === "object" && "uid" in v && v.uid !== "${datasource}") {
      problems.push(`${path}: hard-coded datasource uid ${JSON.stringify(v.uid)} (use "\${datasource}")`);
    }
  }
  const vars = new Map((d.templating?.list ?? []).map((v) => [v.name, v]));
  if (vars.get("datasource")?.type !== "datasource") problems.push(`no datasource variable named "datasource"`);
  if (!String(vars.get("model")?.query ?? "").startsWith("label_values(")) problems.push(`no label_values variable named "model"`);
  const usesEndpoint = panels.some((p) => (p.targets ?? []).some((t) => String(t.expr).includes("$endpoint")));
  if (usesEndpoint && !String(vars.get("endpoint")?.query ?? "").startsWith("label_values(")) {
    problems.push(`queries use $endpoint but there is no label_values variable named "endpoint"`);
  }
  const usesTenant = panels.some((p) => (p.targets ?? []).some((t) => String(t.expr).includes("$tenant")));
  if (usesTenant && !String(vars.get("tenant")?.query ?? "").startsWith("label_values(")) {
    problems.push(`queries use $tenant but there is no label_values variable named "tenant"`);
  }
  const usesUpstream = panels.some((p) => (p.targets ?? []).some((t) => String(t.expr).includes("$upstream")));
  if (usesUpstream && !String(vars.get("upstream")?.query ?? "").startsWith("label_values(")) {
    problems.push(`queries use $upstream but there is no label_values variable named "upstream"`);
  }
  return problems;
}

// ---------- run ----------
const files = process.argv.length > 2
  ? process.argv.slice(2).map((f) => resolve(f))
  : readdirSync(join(root, "grafana", "dashboards")).filter((f) => f.endsWith(".json")).sort().map((f) => join(root, "grafana", "dashboards", f));
if (!files.length) {
  console.error("no dashboards found");
  process.exit(1);
}
let failed = 0;
const uids = new Map();
for (const file of files) {
  const name = relative(root, file);
  let d;
  try {
    d = JSON.parse(readFileSync(file, "utf8"));
  } catch (e) {
    console.error(`${name}: not JSON: ${e.message}`);
    failed++;
    continue;
  }
  const problems = [];
  if (!validateSchema(d)) {
    for (const e of validateSchema.errors) problems.push(`schema: ${e.instancePath || "/"} ${e.message}${e.params ? " " + JSON.stringify(e.params) : ""}`);
  }
  if (!d.uid) problems.push("no uid");
  else if (uids.has(d.uid)) problems.push(`uid ${d.uid} is also used by ${uids.get(d.uid)}`);
  else uids.set(d.uid, name);
  problems.push(...checkDashboard(d));
  if (problems.length) {
    failed++;
    for (const p of problems) console.error(`${name}: ${p}`);
  } else {
    console.log(`ok ${name} (${flatPanels(d.panels).length} panels, @grafana/schema ${schemaVersion} Dashboard)`);
  }
}
console.log(`${files.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
