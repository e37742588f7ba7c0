//! `deploy/kubernetes/`: `kubectl kustomize` renders the base and every overlay; each object
//! of a built-in kind validates (strict) against the API schema of a current Kubernetes minor;
//! the Prometheus Operator objects, which have no schema there, have their required fields;
//! and the pieces agree with each other: the ConfigMap's berth.toml passes `berth check-config`,
//! and the StatefulSet's grace period, volume size, ports and mounts fit that config.
//!
//! The kustomize is the one inside kubectl on this machine image (v5); Debian's
//! `kubernetes-client` (1.20) carries a kustomize too old for `replacements`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::tools::{assert_ok, berth_binary, deploy, have, run_ok, tool, with_address};

/// The Kubernetes minor the objects are validated against: the oldest still supported.
const KUBERNETES: &str = "1.35.0";

#[test]
fn base_renders_into_valid_objects_that_fit_its_config() {
    check_rendering(
        "base_renders_into_valid_objects_that_fit_its_config",
        "base",
        true,
    );
}

#[test]
fn example_overlay_renders_into_valid_objects_that_fit_its_config() {
    let test = "example_overlay_renders_into_valid_objects_that_fit_its_config";
    let objects = check_rendering(test, "overlays/example", false);
    let Some(objects) = objects else { return };
    // The overlay's own values arrived: its address, replicas, and pull secret.
    assert_eq!(
        object(&objects, "Service", "berth-nodes")["spec"]["clusterIP"],
        "10.100.0.50"
    );
    assert_eq!(
        object(&objects, "StatefulSet", "berth")["spec"]["replicas"],
        3
    );
    let secret = object(&objects, "Secret", "berth-pull-secrets");
    assert!(secret["data"].get("ghcr.json").is_some(), "{secret}");
}

#[test]
fn hostpath_overlay_renders_into_valid_objects_that_fit_its_config() {
    let test = "hostpath_overlay_renders_into_valid_objects_that_fit_its_config";
    let objects = check_rendering(test, "overlays/hostpath", false);
    let Some(objects) = objects else { return };
    let pod = &object(&objects, "StatefulSet", "berth")["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        serde_json::json!(["CHOWN"])
    );
}

/// Renders `dir` under deploy/kubernetes and checks everything; `None` if a tool is missing.
fn check_rendering(test: &str, dir: &str, negative_control: bool) -> Option<Vec<Value>> {
    if !have(test, &["kubectl", "kubernetes-validate", "python3"]) {
        return None;
    }
    let version = run_ok(command("kubectl", &["version", "--client"]));
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    eprintln!("rendering with kubectl's kustomize:\n{version}");
    assert!(version.contains("Kustomize Version: v5"), "{version}");

    let dir = deploy("kubernetes").join(dir);
    let rendered = run_ok(command(
        "kubectl",
        &["kustomize", &dir.display().to_string()],
    ));
    let objects = yaml_documents(&rendered.stdout);
    let work = tempfile::tempdir().unwrap();
    validate_builtin(&objects, work.path(), negative_control);
    check_operator_objects(&objects);
    check_dashboard(&objects);
    let config = check_config_map(&objects, work.path());
    check_statefulset(&objects, &config);
    check_services_and_policies(&objects, &config);
    check_node_hosts(&objects, work.path());
    Some(objects)
}

fn command(program: &str, args: &[&str]) -> Command {
    let mut command = tool(program);
    command.args(args);
    command
}

/// YAML documents as JSON values, read by PyYAML (kubernetes-validate's own YAML reader).
fn yaml_documents(yaml: &[u8]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.yaml");
    std::fs::write(&path, yaml).unwrap();
    let script = "import sys, json, yaml\n\
                  docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                  json.dump(docs, sys.stdout)";
    let converted = run_ok(command(
        "python3",
        &["-c", script, &path.display().to_string()],
    ));
    serde_json::from_slice(&converted.stdout).expect("PyYAML's JSON")
}

/// Built-in kinds: the core group and the groups Kubernetes itself serves.
fn is_builtin(object: &Value) -> bool {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    match api_version.split_once('/') {
        None => true,
        Some((group, _)) => !group.contains('.') || group.ends_with(".k8s.io"),
    }
}

fn validate_builtin(objects: &[Value], work: &Path, negative_control: bool) {
    let mut files = Vec::new();
    for (i, object) in objects.iter().filter(|o| is_builtin(o)).enumerate() {
        let path = work.join(format!("object-{i}.yaml"));
        std::fs::write(&path, serde_json::to_vec(object).unwrap()).unwrap();
        files.push(path.display().to_string());
    }
    assert!(
        files.len() >= 9,
        "too few built-in objects: {}",
        files.len()
    );
    let mut args = vec!["--strict", "--quiet", "-k", KUBERNETES];
    args.extend(files.iter().map(String::as_str));
    let validated = command("kubernetes-validate", &args)
        .output()
        .expect("run kubernetes-validate");
    assert_ok("kubernetes-validate --strict", &validated);

    if negative_control {
        // The validator rejects an unknown field, so a pass above means something.
        let mut broken = object(objects, "StatefulSet", "berth").clone();
        broken["spec"]["replica"] = 2.into();
        let path = work.join("broken.yaml");
        std::fs::write(&path, serde_json::to_vec(&broken).unwrap()).unwrap();
        let args = [
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES,
            &path.display().to_string(),
        ];
        let rejected = command("kubernetes-validate", &args)
            .output()
            .expect("run kubernetes-validate");
        assert!(
            !rejected.status.success(),
            "a misspelt field passed strict validation"
        );
    }
}

/// The one object of `kind` whose name is `name` or `name-<hash>` (kustomize generators).
fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind)
        .filter(|o| {
            let actual = o["metadata"]["name"].as_str().unwrap_or_default();
            actual == name
                || actual
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('-') && rest.len() == 11)
        })
        .collect();
    assert_eq!(found.len(), 1, "{kind} {name}: found {}", found.len());
    found[0]
}

fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

/// ServiceMonitor and PrometheusRule: no schema in kubernetes-validate, so their required
/// fields are checked here, and they must point at things that exist.
fn check_operator_objects(objects: &[Value]) {
    let monitor = object(objects, "ServiceMonitor", "berth");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .filter(|m| !m.is_empty())
        .expect("ServiceMonitor spec.selector.matchLabels");
    let services: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "Service")
        .filter(|s| {
            selector
                .iter()
                .all(|(k, v)| &s["metadata"]["labels"][k] == v)
        })
        .collect();
    assert_eq!(
        services.len(),
        1,
        "the ServiceMonitor selects {} Services",
        services.len()
    );
    let endpoints = monitor["spec"]["endpoints"]
        .as_array()
        .expect("spec.endpoints");
    assert!(!endpoints.is_empty());
    for endpoint in endpoints {
        let port = text(&endpoint["port"], "endpoint port");
        let ports = services[0]["spec"]["ports"].as_array().unwrap();
        assert!(
            ports.iter().any(|p| p["name"] == port),
            "no Service port {port}"
        );
        assert_eq!(endpoint["path"], "/metrics");
    }

    let rule = object(objects, "PrometheusRule", "berth");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    let groups = rule["spec"]["groups"].as_array().expect("spec.groups");
    assert!(!groups.is_empty());
    for group in groups {
        text(&group["name"], "group name");
        let rules = group["rules"].as_array().expect("group rules");
        assert!(!rules.is_empty());
        for rule in rules {
            let named = rule.get("alert").or_else(|| rule.get("record"));
            assert!(
                named.and_then(Value::as_str).is_some(),
                "rule without alert/record: {rule}"
            );
            text(&rule["expr"], "rule expr");
        }
    }
    let alerts = std::fs::read(deploy("alerts.yml")).unwrap();
    let alerts = yaml_documents(&alerts);
    assert_eq!(
        &rule["spec"]["groups"], &alerts[0]["groups"],
        "the PrometheusRule is not deploy/alerts.yml: regenerate it (prometheusrule.yaml says how)"
    );
}

fn check_dashboard(objects: &[Value]) {
    let dashboard = object(objects, "ConfigMap", "berth-grafana-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped = std::fs::read_to_string(deploy("grafana-dashboard.json")).unwrap();
    assert!(
        dashboard["data"]["berth.json"] == shipped.as_str(),
        "the dashboard ConfigMap is not deploy/grafana-dashboard.json: copy it again"
    );
}

/// The ConfigMap's berth.toml passes `berth check-config`; returns it parsed.
fn check_config_map(objects: &[Value], work: &Path) -> berth::config::Config {
    let map = object(objects, "ConfigMap", "berth-config");
    let toml = text(&map["data"]["berth.toml"], "berth.toml");
    let path = work.join("berth.toml");
    std::fs::write(&path, toml).unwrap();
    let mut check = Command::new(berth_binary());
    check.arg("check-config").arg("--config").arg(&path);
    run_ok(check);
    berth::config::Config::from_toml(toml).expect("checked config parses")
}

/// `110Gi`, `512Mi`, `1000`: the binary-suffixed quantities the manifests use.
fn quantity(text: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
    ];
    for (suffix, unit) in units {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<u64>().expect("quantity") * unit;
        }
    }
    text.parse()
        .unwrap_or_else(|_| panic!("unsupported quantity {text}"))
}

fn check_statefulset(objects: &[Value], config: &berth::config::Config) {
    let set = object(objects, "StatefulSet", "berth");
    let pod = &set["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    assert!(
        Duration::from_secs(grace) > config.limits.shutdown_grace,
        "terminationGracePeriodSeconds {grace} is not longer than shutdown_grace"
    );
    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], 65532);
    assert_eq!(security["fsGroup"], 65532);
    let spread = pod["topologySpreadConstraints"]
        .as_array()
        .expect("topology spread");
    assert!(spread
        .iter()
        .any(|c| c["topologyKey"] == "kubernetes.io/hostname"));

    let container = &pod["containers"][0];
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    for key in ["requests", "limits"] {
        assert!(
            container["resources"][key]["memory"].is_string(),
            "resources.{key}"
        );
    }
    let ports: BTreeMap<&str, u64> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                text(&p["name"], "port name"),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports["api"], u64::from(config.listen.port()));
    assert_eq!(ports["admin"], u64::from(config.admin_listen.port()));
    assert!(
        config.admin_listen.ip().is_unspecified(),
        "probes cannot reach a loopback admin listener"
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "admin");

    // Mounts: the cache where the config puts it, the config file's directory, and a whole
    // Secret directory for every secret file; subPath nowhere.
    assert!(
        !serde_json::to_string(objects).unwrap().contains("subPath"),
        "subPath stops updates"
    );
    let mounts: BTreeMap<&str, &str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                text(&m["name"], "mount name"),
                text(&m["mountPath"], "mountPath"),
            )
        })
        .collect();
    assert_eq!(Path::new(mounts["cache"]), config.cache.dir);
    let volumes = pod["volumes"].as_array().unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name);
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| text(a, "arg"))
        .collect();
    let config_file = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let config_dir = Path::new(config_file).parent().unwrap();
    let (name, _) = mounts
        .iter()
        .find(|(_, path)| Path::new(path) == config_dir)
        .expect("config mount");
    assert!(volume(name).unwrap()["configMap"]["name"]
        .as_str()
        .unwrap()
        .starts_with("berth-config"));
    let secrets = config.secrets.iter().map(|s| s.file.parent().unwrap());
    let access = [
        config.access.principals.as_deref().and_then(Path::parent),
        config.access.policies.as_deref(),
    ];
    for dir in secrets.chain(access.into_iter().flatten()) {
        let (name, _) = mounts
            .iter()
            .find(|(_, path)| Path::new(path) == dir)
            .unwrap_or_else(|| panic!("nothing mounted at {}", dir.display()));
        assert!(
            volume(name).unwrap()["secret"]["secretName"].is_string(),
            "{name} is not a Secret"
        );
    }

    // The cache volume holds max_size + min_free.
    let needed = config.cache.max_size + config.cache.min_free.unwrap_or(0);
    match set["spec"]["volumeClaimTemplates"].as_array() {
        Some(claims) => {
            let claim = claims
                .iter()
                .find(|c| c["metadata"]["name"] == "cache")
                .expect("cache claim");
            let size = quantity(text(
                &claim["spec"]["resources"]["requests"]["storage"],
                "storage",
            ));
            assert!(
                size >= needed,
                "PVC of {size} bytes < max_size + min_free = {needed}"
            );
        }
        None => assert!(
            volume("cache").unwrap()["hostPath"]["path"].is_string(),
            "no cache volume"
        ),
    }
}

fn check_services_and_policies(objects: &[Value], config: &berth::config::Config) {
    let peers = object(objects, "Service", "berth-peers");
    assert_eq!(peers["spec"]["clusterIP"], "None");
    let nodes = object(objects, "Service", "berth-nodes");
    let ip = text(&nodes["spec"]["clusterIP"], "clusterIP");
    ip.parse::<std::net::IpAddr>().expect("a fixed ClusterIP");
    assert_eq!(
        nodes["spec"]["ports"][0]["port"],
        u64::from(config.listen.port())
    );

    let pod_labels =
        &object(objects, "StatefulSet", "berth")["spec"]["template"]["metadata"]["labels"];
    for (kind, selector) in [
        ("PodDisruptionBudget", "/spec/selector/matchLabels"),
        ("NetworkPolicy", "/spec/podSelector/matchLabels"),
        ("Service", "/spec/selector"),
    ] {
        for selected in objects.iter().filter(|o| o["kind"] == kind) {
            let labels = selected
                .pointer(selector)
                .and_then(Value::as_object)
                .expect(selector);
            if kind == "Service"
                && selected["metadata"]["name"] != "berth-peers"
                && selected["metadata"]["name"] != "berth-nodes"
            {
                continue;
            }
            assert!(
                labels.iter().all(|(k, v)| &pod_labels[k] == v),
                "{kind} selects other pods"
            );
        }
    }
    let policy = object(objects, "NetworkPolicy", "berth");
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    let admin = rules
        .iter()
        .find(|r| r["ports"][0]["port"] == "admin")
        .expect("admin rule");
    assert_eq!(
        admin["from"],
        serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}])
    );
    assert!(
        rules.iter().any(|r| r["ports"][0]["port"] == "api"),
        "no rule for the API port"
    );
}

/// The DaemonSet's own script, run here on the ConfigMap's files, writes exactly the shipped
/// deploy/nodes/containerd files with the berth-nodes ClusterIP in them.
fn check_node_hosts(objects: &[Value], work: &Path) {
    let daemon = object(objects, "DaemonSet", "berth-node-hosts");
    let container = &daemon["spec"]["template"]["spec"]["containers"][0];
    let script = text(&container["args"][0], "script");
    let env: BTreeMap<&str, &str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (text(&e["name"], "env name"), text(&e["value"], "env value")))
        .collect();
    let nodes = object(objects, "Service", "berth-nodes");
    assert_eq!(
        env["BERTH_IP"], nodes["spec"]["clusterIP"],
        "hosts.toml would name another address"
    );
    assert_eq!(
        env["BERTH_PORT"],
        nodes["spec"]["ports"][0]["port"].to_string()
    );

    let templates = work.join("templates");
    let hosts = work.join("certs.d");
    std::fs::create_dir(&templates).unwrap();
    let map = object(objects, "ConfigMap", "berth-node-hosts");
    for (key, value) in map["data"].as_object().unwrap() {
        std::fs::write(templates.join(key), text(value, key)).unwrap();
    }
    let mut run = Command::new("sh");
    run.args(["-c", script])
        .env("TEMPLATES", &templates)
        .env("HOSTS_DIR", &hosts)
        .env("ONCE", "1")
        .envs(env.iter().map(|(k, v)| (*k, *v)));
    run_ok(run);

    let address = format!("{}:{}", env["BERTH_IP"], env["BERTH_PORT"]);
    let shipped = deploy("nodes/containerd");
    let mut registries = 0;
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let registry = entry.unwrap().file_name();
        let expected = with_address(&shipped.join(&registry).join("hosts.toml"), &address);
        let written = std::fs::read_to_string(hosts.join(&registry).join("hosts.toml"))
            .unwrap_or_else(|e| panic!("{registry:?} not written: {e}"));
        assert_eq!(
            written, expected,
            "{registry:?}: ConfigMap differs from deploy/nodes"
        );
        registries += 1;
    }
    assert_eq!(std::fs::read_dir(&hosts).unwrap().count(), registries);
    assert!(registries >= 6);
}
