//! The real kubectl against `baton up`: the everyday commands, asserted on what kubectl
//! prints and its exit codes; and bad requests, asserted on the exact Status.

#[path = "support/baton.rs"]
mod baton;

use std::io::{BufRead, BufReader};
use std::time::Duration;

use baton::{jsonpath, wait_until, write, Baton};
use serde_json::{json, Value};

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: registry.local/http-hello:1.0
        env:
        - {name: GREETING, value: hello}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
"#;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: solo
  labels: {app: solo, tier: back}
spec:
  containers:
  - name: main
    image: registry.local/hello:1.0
"#;

#[test]
fn versions_discovery_and_api_resources_with_each_kubectl() {
    let b = Baton::start();
    let v = b.ok(&["version"]);
    assert!(v.contains("Server Version: v1.33.0-baton"), "{v}");
    for bin in ["kubectl", "kubectl.1.29", "kubectl.1.33"] {
        let out = b.ok_with(bin, &["api-resources"], None);
        for want in [
            "deployments",
            "deploy",
            "apps/v1",
            "endpointslices",
            "leases",
            "pods",
            "po",
        ] {
            assert!(
                out.contains(want),
                "{bin} api-resources lacks {want}:\n{out}"
            );
        }
        let ns = b.ok_with(bin, &["get", "ns"], None);
        for want in ["default", "kube-system", "kube-node-lease", "Active"] {
            assert!(ns.contains(want), "{bin} get ns lacks {want}:\n{ns}");
        }
        let out = b.ok_with(bin, &["apply", "-f", "-"], Some(POD));
        assert!(out.contains("pod/solo"), "{bin}: {out}");
        let out = b.ok_with(bin, &["get", "pods"], None);
        assert!(
            out.contains("NAME")
                && out.contains("READY")
                && out.contains("STATUS")
                && out.contains("solo"),
            "{bin}: {out}"
        );
    }
}

#[test]
fn apply_client_side_and_server_side_then_reapply_changed() {
    let b = Baton::start();
    let f = write(b.dir.path(), "web.yaml", DEPLOYMENT);
    let f = f.to_str().unwrap();
    let out = b.ok(&["apply", "-f", f]);
    assert!(
        out.contains("deployment.apps/web created") && out.contains("service/web created"),
        "{out}"
    );
    assert!(b
        .ok(&["apply", "-f", f])
        .contains("deployment.apps/web unchanged"));
    let changed = DEPLOYMENT
        .replace("replicas: 2", "replicas: 3")
        .replace("value: hello", "value: hi");
    write(b.dir.path(), "web.yaml", &changed);
    assert!(b
        .ok(&["apply", "-f", f])
        .contains("deployment.apps/web configured"));
    let got = b.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas} {.metadata.generation} {.spec.template.spec.containers[0].env[0].value}"]);
    assert_eq!(got, "3 2 hi");

    // Server-side apply on top: co-owns the same values, then changes one.
    let out = b.ok(&["apply", "--server-side", "-f", f]);
    assert!(out.contains("serverside-applied"), "{out}");
    b.ok(&["scale", "deploy", "web", "--replicas=5"]);
    let conflicting = changed.replace("replicas: 3", "replicas: 4");
    write(b.dir.path(), "web.yaml", &conflicting);
    let err = b.fails(&["apply", "--server-side", "-f", f], None);
    assert!(
        err.contains("conflict") && err.contains(".spec.replicas"),
        "{err}"
    );
    let out = b.ok(&["apply", "--server-side", "--force-conflicts", "-f", f]);
    assert!(out.contains("serverside-applied"), "{out}");
    assert_eq!(
        b.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "4"
    );
    // A fresh object through server-side apply is created.
    let out = b.ok_with("kubectl", &["apply", "--server-side", "-f", "-"], Some(POD));
    assert!(out.contains("pod/solo serverside-applied"), "{out}");
    let mf = b.ok(&[
        "get",
        "pod",
        "solo",
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[0].manager} {.metadata.managedFields[0].operation}",
    ]);
    assert_eq!(mf, "kubectl Apply");
}

#[test]
fn create_and_get_in_every_format() {
    let b = Baton::start();
    assert!(b
        .ok_with("kubectl", &["create", "-f", "-"], Some(POD))
        .contains("pod/solo created"));
    let err = b.fails(&["create", "-f", "-"], Some(POD));
    assert!(
        err.contains("AlreadyExists") && err.contains("\"solo\" already exists"),
        "{err}"
    );
    b.ok(&["create", "namespace", "other"]);
    b.ok(&[
        "create",
        "configmap",
        "cfg",
        "-n",
        "other",
        "--from-literal=a=1",
    ]);
    b.ok(&[
        "create",
        "deployment",
        "api",
        "--image=registry.local/api:2",
        "--replicas=2",
    ]);

    let wide = b.ok(&["get", "pods", "-o", "wide"]);
    for col in ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"] {
        assert!(wide.contains(col), "{wide}");
    }
    assert!(
        wide.contains("solo") && wide.contains("0/1") && wide.contains("Pending"),
        "{wide}"
    );
    let y = b.ok(&["get", "pod", "solo", "-o", "yaml"]);
    assert!(
        y.contains("kind: Pod") && y.contains("resourceVersion:") && y.contains("uid:"),
        "{y}"
    );
    let j: Value = serde_json::from_str(&b.ok(&["get", "pod", "solo", "-o", "json"])).unwrap();
    assert_eq!(
        j["spec"]["containers"][0]["image"],
        "registry.local/hello:1.0"
    );
    assert_eq!(
        j["spec"]["restartPolicy"], "Always",
        "defaults are filled in"
    );
    let all = b.ok(&["get", "cm,deploy", "-A"]);
    assert!(
        all.contains("NAMESPACE")
            && all.contains("other")
            && all.contains("cfg")
            && all.contains("deployment.apps/api"),
        "{all}"
    );
    let labelled = b.ok(&["get", "pods", "-l", "tier=back", "-o", "name"]);
    assert_eq!(labelled.trim(), "pod/solo");
    assert_eq!(
        b.ok(&["get", "pods", "-l", "tier!=back", "-o", "name"])
            .trim(),
        ""
    );
    let deploys = b.ok(&["get", "deploy"]);
    for col in ["READY", "UP-TO-DATE", "AVAILABLE", "0/2"] {
        assert!(deploys.contains(col), "{deploys}");
    }
    let err = b.fails(&["get", "pod", "missing"], None);
    assert!(
        err.contains("NotFound") && err.contains("pods \"missing\" not found"),
        "{err}"
    );
    // Pages: limit/continue through --chunk-size.
    for i in 0..7 {
        b.ok(&["create", "configmap", &format!("page-{i}")]);
    }
    let names = b.ok(&["get", "cm", "--chunk-size=2", "-o", "name"]);
    assert_eq!(
        names.lines().filter(|l| l.contains("page-")).count(),
        7,
        "{names}"
    );
}

#[test]
fn watch_streams_changes() {
    let b = Baton::start();
    let mut w = b.spawn(&["get", "pods", "-w", "--output-watch-events"]);
    let stdout = w.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(POD));
    b.ok(&["label", "pod", "solo", "seen=yes"]);
    b.ok(&["delete", "pod", "solo", "--wait=false"]);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("DELETED")) {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("watch output");
        seen.push(line);
    }
    let _ = w.kill();
    let _ = w.wait();
    let joined = seen.join("\n");
    assert!(
        joined.contains("ADDED") && joined.contains("MODIFIED") && joined.contains("solo"),
        "{joined}"
    );
}

#[test]
fn label_annotate_patch_and_scale() {
    let b = Baton::start();
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(DEPLOYMENT));
    assert!(b
        .ok(&["label", "deploy", "web", "team=blue"])
        .contains("labeled"));
    assert!(b
        .ok(&["annotate", "deploy", "web", "note=hi"])
        .contains("annotated"));
    let err = b.fails(&["label", "deploy", "web", "bad key=x"], None);
    assert!(!err.is_empty());
    b.ok(&["patch", "deploy", "web", "-p", r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"registry.local/http-hello:2.0"}]}}}}"#]);
    b.ok(&[
        "patch",
        "deploy",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"merged":"yes"}}}"#,
    ]);
    b.ok(&[
        "patch",
        "deploy",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#,
    ]);
    let got = b.ok(&["get", "deploy", "web", "-o", "jsonpath={.metadata.labels.team} {.metadata.annotations.note} {.metadata.labels.merged} {.spec.replicas} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].env[0].name}"]);
    assert_eq!(
        got, "blue hi yes 4 registry.local/http-hello:2.0 GREETING",
        "the strategic patch merged the container by name"
    );
    assert!(b
        .ok(&["scale", "deploy", "web", "--replicas=1"])
        .contains("scaled"));
    assert_eq!(
        b.ok(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "1"
    );
    let err = b.fails(
        &[
            "patch",
            "deploy",
            "web",
            "--type=json",
            "-p",
            r#"[{"op":"test","path":"/spec/replicas","value":9}]"#,
        ],
        None,
    );
    assert!(!err.is_empty());
}

#[test]
fn describe_wait_and_rollout_status() {
    let b = Baton::start();
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(DEPLOYMENT));
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(POD));
    let d = b.ok(&["describe", "pod", "solo"]);
    assert!(
        d.contains("Name:") && d.contains("solo") && d.contains("registry.local/hello:1.0"),
        "{d}"
    );
    let d = b.ok(&["describe", "deploy", "web"]);
    assert!(
        d.contains("Replicas:") && d.contains("RollingUpdate"),
        "{d}"
    );

    // No kubelet yet: the test plays its part and writes the pod's status.
    let mut waiter = b.spawn(&["wait", "--for=condition=Ready", "pod/solo", "--timeout=30s"]);
    b.ok(&[
        "patch",
        "pod",
        "solo",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}"#,
    ]);
    let status = waiter.wait().unwrap();
    assert!(status.success(), "kubectl wait ended with {status}");

    // Rollout status waits for the controller's status; the test writes it.
    let rollout = b.spawn(&["rollout", "status", "deploy/web", "--timeout=30s"]);
    let gen = b.ok(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    let status = json!({"status": {"observedGeneration": gen.parse::<i64>().unwrap(), "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2,
        "conditions": [{"type": "Available", "status": "True"}, {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}});
    b.ok(&[
        "patch",
        "deploy",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    let out = rollout.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("successfully rolled out"),
        "{text}"
    );
    // Status writes through the main resource are ignored, as in Kubernetes.
    b.ok(&[
        "patch",
        "deploy",
        "web",
        "--type=merge",
        "-p",
        r#"{"status":{"replicas":99}}"#,
    ]);
    assert_eq!(
        b.ok(&["get", "deploy", "web", "-o", "jsonpath={.status.replicas}"]),
        "2"
    );
}

#[test]
fn explain_reads_the_openapi_documents() {
    let b = Baton::start();
    let out = b.ok(&["explain", "deployments"]);
    assert!(
        out.contains("KIND:") && out.contains("Deployment") && out.contains("apps"),
        "{out}"
    );
    // The Swagger 2.0 document, which kubectl reads as protobuf.
    let out = b.ok(&[
        "explain",
        "deployments.spec.strategy",
        "--output=plaintext-openapiv2",
    ]);
    assert!(
        out.contains("DeploymentStrategy") && out.contains("rollingUpdate"),
        "{out}"
    );
    let out = b.ok(&["explain", "statefulsets", "--output=plaintext-openapiv2"]);
    assert!(out.contains("StatefulSet"), "{out}");
    let raw: Value = serde_json::from_str(&b.ok(&["get", "--raw", "/openapi/v2"])).unwrap();
    assert_eq!(raw["swagger"], "2.0");
    assert!(raw["definitions"]["io.k8s.api.batch.v1.CronJob"].is_object());
}

#[test]
fn delete_with_finalizers_and_preconditions() {
    let b = Baton::start();
    b.ok(&["create", "configmap", "held"]);
    b.ok(&[
        "patch",
        "cm",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["example.com/hold"]}}"#,
    ]);
    let out = b.ok(&["delete", "cm", "held", "--wait=false"]);
    assert!(out.contains("deleted"), "{out}");
    let ts = b.ok(&[
        "get",
        "cm",
        "held",
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(
        !ts.is_empty(),
        "a finalizer holds the object, marked for deletion"
    );
    b.ok(&[
        "patch",
        "cm",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    wait_until(Duration::from_secs(10), "the object to go", || {
        let out = b.run("kubectl", &["get", "cm", "held"], None);
        (!out.status.success()).then_some(())
    });
    b.ok(&["create", "configmap", "plain"]);
    let out = b.ok(&["delete", "cm", "plain"]);
    assert!(out.contains("configmap \"plain\" deleted"), "{out}");
}

#[test]
fn bad_requests_get_the_right_status() {
    let b = Baton::start();
    let t = b.token();
    let tok = Some(t.as_str());
    let pods = "/api/v1/namespaces/default/pods";
    let check = |(code, status): (u16, Value), want_code: u16, want_reason: &str| {
        assert_eq!(code, want_code, "{status}");
        assert_eq!(status["kind"], "Status", "{status}");
        assert_eq!(status["code"], want_code, "{status}");
        assert_eq!(status["reason"], want_reason, "{status}");
        status
    };
    // Unauthenticated, and a wrong token.
    check(
        b.curl("GET", pods, "application/json", None, None),
        401,
        "Unauthorized",
    );
    check(
        b.curl("GET", pods, "application/json", None, Some("nope")),
        401,
        "Unauthorized",
    );
    // Malformed JSON.
    let s = check(
        b.curl(
            "POST",
            pods,
            "application/json",
            Some(b"{\"apiVersion\": \"v1\", "),
            tok,
        ),
        400,
        "BadRequest",
    );
    assert!(
        s["message"].as_str().unwrap().contains("error decoding"),
        "{s}"
    );
    // An unknown kind (no such resource).
    check(
        b.curl(
            "POST",
            "/apis/apps/v1/namespaces/default/widgets",
            "application/json",
            Some(b"{}"),
            tok,
        ),
        404,
        "NotFound",
    );
    // A body whose apiVersion does not match the resource.
    let wrong = json!({"apiVersion": "v2", "kind": "Pod", "metadata": {"name": "x"}});
    let s = check(
        b.curl(
            "POST",
            pods,
            "application/json",
            Some(wrong.to_string().as_bytes()),
            tok,
        ),
        400,
        "BadRequest",
    );
    assert!(
        s["message"].as_str().unwrap().contains("do not match"),
        "{s}"
    );
    // A missing name, and an invalid label: 422 naming the fields.
    let noname = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {"containers": [{"name": "a", "image": "i"}]}});
    let s = check(
        b.curl(
            "POST",
            pods,
            "application/json",
            Some(noname.to_string().as_bytes()),
            tok,
        ),
        422,
        "Invalid",
    );
    assert_eq!(s["details"]["causes"][0]["field"], "metadata.name", "{s}");
    let badlabel = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "labels": {"ok": "not ok!"}}, "spec": {"containers": [{"name": "a", "image": "i"}]}});
    let s = check(
        b.curl(
            "POST",
            pods,
            "application/json",
            Some(badlabel.to_string().as_bytes()),
            tok,
        ),
        422,
        "Invalid",
    );
    assert_eq!(
        s["details"]["causes"][0]["field"], "metadata.labels.ok",
        "{s}"
    );
    // Unknown and duplicate fields under Strict validation.
    let unknown = br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"u"},"spec":{"bogus":1,"containers":[{"name":"a","image":"i"}]}}"#;
    let s = check(
        b.curl(
            "POST",
            &format!("{pods}?fieldValidation=Strict"),
            "application/json",
            Some(unknown),
            tok,
        ),
        400,
        "BadRequest",
    );
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("unknown field \"spec.bogus\""),
        "{s}"
    );
    let dup = br#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"u","name":"v"},"spec":{"containers":[{"name":"a","image":"i"}]}}"#;
    let s = check(
        b.curl(
            "POST",
            &format!("{pods}?fieldValidation=Strict"),
            "application/json",
            Some(dup),
            tok,
        ),
        400,
        "BadRequest",
    );
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("duplicate field \"metadata.name\""),
        "{s}"
    );
    // An oversized body.
    let big = vec![b' '; 3 * 1024 * 1024 + 10];
    check(
        b.curl("POST", pods, "application/json", Some(&big), tok),
        413,
        "RequestEntityTooLarge",
    );
    // An unsupported media type, and CBOR apply, which is not served.
    check(
        b.curl("POST", pods, "text/plain", Some(b"hello"), tok),
        415,
        "UnsupportedMediaType",
    );
    check(
        b.curl(
            "PATCH",
            "/api/v1/namespaces/default/configmaps/y?fieldManager=t",
            "application/apply-patch+cbor",
            Some(b"\xa0"),
            tok,
        ),
        415,
        "UnsupportedMediaType",
    );
    // A YAML body is read as YAML; a malformed one is a 400 that says where.
    let yaml = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: y\ndata:\n  a: '1'\n";
    let (code, made) = b.curl(
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/yaml",
        Some(yaml),
        tok,
    );
    assert_eq!((code, &made["data"]["a"]), (201, &json!("1")), "{made}");
    let apply = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: y\ndata:\n  a: '2'\n";
    let (code, applied) = b.curl(
        "PATCH",
        "/api/v1/namespaces/default/configmaps/y?fieldManager=t&force=true",
        "application/apply-patch+yaml",
        Some(apply),
        tok,
    );
    assert_eq!(
        (code, &applied["data"]["a"]),
        (200, &json!("2")),
        "{applied}"
    );
    let s = check(
        b.curl(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            "application/yaml",
            Some(b"metadata: [name: x\n"),
            tok,
        ),
        400,
        "BadRequest",
    );
    assert!(s["message"].as_str().unwrap().contains("yaml"), "{s}");
    // A stale resourceVersion.
    let good = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "1"}});
    let (code, created) = b.curl(
        "POST",
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        Some(good.to_string().as_bytes()),
        tok,
    );
    assert_eq!(code, 201, "{created}");
    let mut v1 = created.clone();
    v1["data"]["a"] = json!("2");
    let (code, _) = b.curl(
        "PUT",
        "/api/v1/namespaces/default/configmaps/c",
        "application/json",
        Some(v1.to_string().as_bytes()),
        tok,
    );
    assert_eq!(code, 200);
    let mut stale = created;
    stale["data"]["a"] = json!("3");
    let s = check(
        b.curl(
            "PUT",
            "/api/v1/namespaces/default/configmaps/c",
            "application/json",
            Some(stale.to_string().as_bytes()),
            tok,
        ),
        409,
        "Conflict",
    );
    assert!(
        s["message"]
            .as_str()
            .unwrap()
            .contains("the object has been modified"),
        "{s}"
    );
    // Creating in a namespace that does not exist.
    check(
        b.curl(
            "POST",
            "/api/v1/namespaces/nowhere/configmaps",
            "application/json",
            Some(good.to_string().as_bytes()),
            tok,
        ),
        404,
        "NotFound",
    );
    // Malformed YAML never leaves kubectl, and kubectl says why.
    let err = b.fails(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata: [unclosed\n"),
    );
    assert!(err.to_lowercase().contains("yaml"), "{err}");
}

const CHART: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: app}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reader}
rules:
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: app-reads}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}
subjects:
- {kind: ServiceAccount, name: app, namespace: default}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: app-nodes}
rules:
- apiGroups: [""]
  resources: [nodes]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: app-nodes}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: app-nodes}
subjects:
- {kind: ServiceAccount, name: app, namespace: default}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: chart-nginx}
spec: {controller: k8s.io/ingress-nginx}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web}
spec:
  ingressClassName: chart-nginx
  rules:
  - host: web.example
    http:
      paths:
      - path: /
        pathType: Prefix
        backend: {service: {name: web, port: {number: 80}}}
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: web}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 1
  maxReplicas: 5
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
---
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {name: batch-low}
value: 1000
description: background work
---
apiVersion: v1
kind: ConfigMap
metadata: {name: web-config}
data: {greeting: hello}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: app
      containers:
      - name: web
        image: registry.local/http-hello:1.0
        envFrom: [{configMapRef: {name: web-config}}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {name: web}
spec:
  minAvailable: 1
  selector: {matchLabels: {app: web}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report}
spec:
  schedule: "0 3 * * *"
  timeZone: Europe/Paris
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers:
          - name: report
            image: registry.local/hello:1.0
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: agent, image: registry.local/hello:1.0}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 0
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers: [{name: db, image: registry.local/hello:1.0}]
---
apiVersion: v1
kind: ResourceQuota
metadata: {name: compute}
spec:
  hard: {pods: "20", requests.cpu: "4", requests.memory: 8Gi}
---
apiVersion: v1
kind: LimitRange
metadata: {name: defaults}
spec:
  limits:
  - type: Container
    defaultRequest: {cpu: 100m, memory: 64Mi}
    default: {cpu: 500m, memory: 256Mi}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: fast}
provisioner: baton.dev/local
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
"#;

/// A chart rendered into a kustomization, as `kubectl apply -k` reads it.
const KUSTOMIZATION: &str = r#"
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [chart.yaml]
commonLabels: {app.kubernetes.io/part-of: chart}
"#;

/// The kinds charts render besides workloads are served: applied, shown with their
/// columns, reapplied unchanged, and checked where Kubernetes checks them.
#[test]
fn chart_kinds_apply_print_and_reapply_unchanged() {
    // The controllers empty a deleted namespace; no node is needed.
    let b = Baton::start_with(&["--no-node"]);
    let chart = b.dir.path().join("chart");
    std::fs::create_dir(&chart).unwrap();
    write(&chart, "chart.yaml", CHART);
    write(&chart, "kustomization.yaml", KUSTOMIZATION);
    let f = chart.to_str().unwrap();
    b.ok(&["create", "namespace", "chart"]);
    b.ok(&["config", "set-context", "--current", "--namespace=chart"]);
    let out = b.ok(&["apply", "-k", f]);
    for want in [
        "serviceaccount/app created",
        "role.rbac.authorization.k8s.io/reader created",
        "rolebinding.rbac.authorization.k8s.io/app-reads created",
        "clusterrole.rbac.authorization.k8s.io/app-nodes created",
        "clusterrolebinding.rbac.authorization.k8s.io/app-nodes created",
        "ingressclass.networking.k8s.io/chart-nginx created",
        "ingress.networking.k8s.io/web created",
        "horizontalpodautoscaler.autoscaling/web created",
        "networkpolicy.networking.k8s.io/web created",
        "priorityclass.scheduling.k8s.io/batch-low created",
        "configmap/web-config created",
        "deployment.apps/web created",
        "service/web created",
        "poddisruptionbudget.policy/web created",
        "cronjob.batch/report created",
        "daemonset.apps/agent created",
        "statefulset.apps/db created",
        "resourcequota/compute created",
        "limitrange/defaults created",
        "storageclass.storage.k8s.io/fast created",
        "persistentvolumeclaim/data created",
    ] {
        assert!(out.contains(want), "lacks {want:?}:\n{out}");
    }
    let pdb_rv = |b: &Baton| {
        b.ok(&[
            "get",
            "pdb",
            "web",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
    };
    let rv_before = pdb_rv(&b);
    let again = b.ok(&["apply", "-k", f]);
    // kubectl always sends a budget's selector (its patch strategy is "replace") and so
    // says "configured", as against Kubernetes; the object must not change.
    assert_eq!(again.matches("unchanged").count(), 20, "{again}");
    assert!(
        again.contains("poddisruptionbudget.policy/web configured"),
        "{again}"
    );
    assert_eq!(pdb_rv(&b), rv_before, "a re-apply changed the budget");
    let out = b.ok(&["get", "cronjob", "report"]);
    assert!(
        out.contains("0 3 * * *") && out.contains("Europe/Paris") && out.contains("false"),
        "{out}"
    );
    let out = b.ok(&["get", "pdb", "web"]);
    assert!(
        out.contains("MIN AVAILABLE") && out.contains("web"),
        "{out}"
    );
    let out = b.ok(&["get", "sc"]);
    assert!(
        out.contains("baton.dev/local") && out.contains("Delete"),
        "{out}"
    );
    let out = b.ok(&["get", "pvc", "data"]);
    assert!(out.contains("Pending"), "{out}");
    let bad_cron = r#"{"apiVersion":"batch/v1","kind":"CronJob","metadata":{"name":"bad"},"spec":{"schedule":"61 * * *","timeZone":"Mars/Olympus","jobTemplate":{"spec":{"template":{"spec":{"restartPolicy":"Never","containers":[{"name":"c","image":"i"}]}}}}}}"#;
    let err = b.fails(&["apply", "-f", "-"], Some(bad_cron));
    assert!(
        err.contains("spec.schedule") && err.contains("spec.timeZone"),
        "{err}"
    );
    let out = b.ok(&["get", "rolebinding", "app-reads", "-o", "wide"]);
    assert!(
        out.contains("Role/reader") && out.contains("default/app"),
        "{out}"
    );
    let out = b.ok(&["get", "ingress", "web"]);
    assert!(
        out.contains("chart-nginx") && out.contains("web.example") && out.contains("80"),
        "{out}"
    );
    let out = b.ok(&["get", "hpa", "web"]);
    assert!(
        out.contains("Deployment/web") && out.contains("cpu: <unknown>/80%"),
        "{out}"
    );
    let out = b.ok(&["get", "netpol"]);
    assert!(out.contains("app=web"), "{out}");
    let out = b.ok(&["get", "all"]);
    assert!(
        out.contains("horizontalpodautoscaler.autoscaling/web"),
        "{out}"
    );
    let out = b.ok(&["api-resources", "--api-group=rbac.authorization.k8s.io"]);
    for want in [
        "roles",
        "rolebindings",
        "clusterroles",
        "clusterrolebindings",
    ] {
        assert!(out.contains(want), "{out}");
    }
    // The quota counts the Deployment's pod with the LimitRange's default requests, and
    // gives it back once the Deployment is gone.
    b.ok(&[
        "wait",
        "--for=jsonpath={.status.used.pods}=1",
        "resourcequota/compute",
        "--timeout=60s",
    ]);
    let out = b.ok(&["get", "quota", "compute"]);
    assert!(
        out.contains("pods: 1/20") && out.contains("requests.cpu: 100m/4"),
        "{out}"
    );
    b.ok(&["delete", "deployment", "web"]);
    b.ok(&[
        "wait",
        "--for=jsonpath={.status.used.pods}=0",
        "resourcequota/compute",
        "--timeout=60s",
    ]);
    // A binding's role cannot change, and a cluster binding names only ClusterRoles.
    let err = b.fails(
        &[
            "patch",
            "rolebinding",
            "app-reads",
            "--type=merge",
            "-p",
            r#"{"roleRef":{"name":"other"}}"#,
        ],
        None,
    );
    assert!(err.contains("cannot change roleRef"), "{err}");
    let bad = r#"{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding","metadata":{"name":"bad"},"roleRef":{"apiGroup":"rbac.authorization.k8s.io","kind":"Role","name":"reader"}}"#;
    let err = b.fails(&["apply", "-f", "-"], Some(bad));
    assert!(
        err.contains("roleRef.kind") && err.contains("ClusterRole"),
        "{err}"
    );
    let bad_hpa = r#"{"apiVersion":"autoscaling/v2","kind":"HorizontalPodAutoscaler","metadata":{"name":"bad"},"spec":{"scaleTargetRef":{"kind":"Deployment","name":"web"},"minReplicas":3,"maxReplicas":2}}"#;
    let err = b.fails(&["apply", "-f", "-"], Some(bad_hpa));
    assert!(err.contains("spec.maxReplicas"), "{err}");
    // Deleting the namespace deletes every kind in it before the namespace goes.
    b.ok(&["delete", "namespace", "chart", "--timeout=60s"]);
    let left = b.ok(&[
        "get",
        "sa,roles,rolebindings,ingresses,hpa,netpol,cm,deploy,svc,pdb,cronjobs,ds,sts,quota,limits,pvc",
        "-n",
        "chart",
        "-o",
        "name",
    ]);
    let left: Vec<&str> = left
        .lines()
        .filter(|l| !l.starts_with("serviceaccount/default"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd], categories: [all]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources:
      status: {}
      scale: {specReplicasPath: .spec.replicas, statusReplicasPath: .status.replicas}
    additionalPrinterColumns:
    - {name: Size, type: string, jsonPath: .spec.size}
    - {name: Replicas, type: integer, jsonPath: .spec.replicas}
    - {name: Color, type: string, jsonPath: .spec.color, priority: 1}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            description: What the widget should be.
            required: [size]
            x-kubernetes-validations:
            - rule: self.replicas <= self.maxReplicas
              messageExpression: "'replicas ' + string(self.replicas) + ' exceeds ' + string(self.maxReplicas)"
            properties:
              size: {type: string, enum: [small, large], description: How big the widget is.}
              replicas: {type: integer, minimum: 0, default: 1}
              maxReplicas: {type: integer, default: 10}
              color: {type: string, pattern: '^[a-z]+$'}
          status:
            type: object
            properties:
              replicas: {type: integer}
"#;

#[test]
fn custom_resources_with_kubectl() {
    let b = Baton::start();
    let f = write(b.dir.path(), "crd.yaml", WIDGET_CRD);
    b.ok(&["apply", "-f", f.to_str().unwrap()]);
    b.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.example.com",
        "--timeout=30s",
    ]);
    let out = b.ok(&["get", "crd"]);
    assert!(out.contains("widgets.example.com"), "{out}");
    // kubectl caches discovery: the new kind is found by a fresh lookup.
    let out = b.ok(&["api-resources", "--api-group=example.com"]);
    assert!(
        out.contains("widgets") && out.contains("wd") && out.contains("Widget"),
        "{out}"
    );
    let w = r#"{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"a"},"spec":{"size":"small","color":"red"}}"#;
    let out = b.ok_with("kubectl", &["apply", "-f", "-"], Some(w));
    assert!(out.contains("widget.example.com/a created"), "{out}");
    let again = b.ok_with("kubectl", &["apply", "-f", "-"], Some(w));
    assert!(again.contains("unchanged"), "{again}");

    let out = b.ok(&["get", "wd", "-o", "wide"]);
    let header = out.lines().next().unwrap();
    for col in ["NAME", "SIZE", "REPLICAS", "COLOR"] {
        assert!(header.contains(col), "{out}");
    }
    assert!(out.contains("small") && out.contains("red"), "{out}");
    let out = b.ok(&["get", "widgets"]);
    assert!(
        !out.contains("COLOR"),
        "priority 1 is only for -o wide: {out}"
    );
    let out = b.ok(&["get", "all"]);
    assert!(out.contains("widget.example.com/a"), "{out}");

    let out = b.ok(&["explain", "widget.spec.size"]);
    assert!(out.contains("How big the widget is"), "{out}");

    b.ok(&["scale", "widget", "a", "--replicas=3"]);
    assert_eq!(jsonpath(&b, &["widget", "a"], "{.spec.replicas}"), "3");
    b.ok(&[
        "patch",
        "widget",
        "a",
        "--type=merge",
        "-p",
        r#"{"spec":{"color":"green"}}"#,
    ]);
    assert_eq!(jsonpath(&b, &["widget", "a"], "{.spec.color}"), "green");

    let editor = write(
        b.dir.path(),
        "editor.sh",
        "#!/bin/sh\nsed -i 's/color: green/color: blue/' \"$1\"\n",
    );
    std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = b.run_env(
        "kubectl",
        &["edit", "widget", "a"],
        None,
        &[("KUBE_EDITOR", editor.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(jsonpath(&b, &["widget", "a"], "{.spec.color}"), "blue");

    // An invalid object: 422 naming each bad field, and the rule's own message.
    let bad = r#"{"apiVersion":"example.com/v1","kind":"Widget","metadata":{"name":"bad"},"spec":{"size":"huge","color":"Red","replicas":20,"maxReplicas":5}}"#;
    let err = b.fails(&["apply", "-f", "-"], Some(bad));
    for want in ["spec.size", "spec.color", "replicas 20 exceeds 5"] {
        assert!(err.contains(want), "{want:?} missing from {err}");
    }
    let err = b.fails(&["get", "widget", "bad"], None);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );

    b.ok(&["delete", "crd", "widgets.example.com", "--timeout=60s"]);
    // Either kubectl's cached discovery still names the kind and the server has no such
    // resource any more, or fresh discovery no longer lists it.
    let err = b.fails(&["get", "widgets.example.com"], None);
    assert!(
        err.contains("the server doesn't have a resource type")
            || err.contains("the server could not find the requested resource"),
        "{err}"
    );
}

#[test]
fn metrics_count_requests_under_kube_apiservers_names_and_are_authorized() {
    let b = Baton::start();
    let lists = |b: &Baton| -> u64 {
        let text = b.ok(&["get", "--raw", "/metrics"]);
        let series = r#"apiserver_request_total{verb="LIST",group="",version="v1",resource="configmaps",subresource="",scope="namespace",component="apiserver",dry_run="",code="200"}"#;
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    let before = lists(&b);
    for _ in 0..5 {
        b.ok(&["get", "configmaps"]);
    }
    assert_eq!(
        lists(&b) - before,
        5,
        "the counter moves by the requests sent"
    );
    let text = b.ok(&["get", "--raw", "/metrics"]);
    for name in [
        "apiserver_request_duration_seconds_bucket{",
        "apiserver_current_inflight_requests{",
        "etcd_server_has_leader 1",
        "etcd_server_leader_changes_seen_total 1",
        "etcd_mvcc_db_total_size_in_bytes ",
        "baton_store_apply_lag_entries ",
    ] {
        assert!(text.contains(name), "no {name} in:\n{text}");
    }
    // Writes went through the Raft log: its syncs, the batches and the proposals timed.
    for name in [
        "etcd_disk_wal_fsync_duration_seconds_count",
        "etcd_disk_backend_commit_duration_seconds_count",
        "baton_store_proposal_duration_seconds_count",
    ] {
        let count: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
            .trim()
            .parse()
            .unwrap();
        assert!(count > 0, "{name} {count}");
    }
    // Objects stored, per resource, as kube-apiserver names them.
    let namespaces: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"apiserver_storage_objects{resource="namespaces"} "#))
        .unwrap_or_else(|| panic!("no namespaces count in:\n{text}"))
        .parse()
        .unwrap();
    assert!(
        namespaces >= 4,
        "default, kube-system, kube-public, kube-node-lease"
    );
    // A watch is counted while it lasts.
    let watches = |b: &Baton| -> u64 {
        let text = b.ok(&["get", "--raw", "/metrics"]);
        let series = r#"apiserver_longrunning_requests{verb="WATCH",group="",version="v1",resource="configmaps",subresource="",scope="namespace",component="apiserver"} "#;
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    let mut watch = b.spawn(&["get", "configmaps", "--watch"]);
    wait_until(Duration::from_secs(30), "the watch counted", || {
        (watches(&b) == 1).then_some(())
    });
    let _ = watch.kill();
    let _ = watch.wait();
    wait_until(
        Duration::from_secs(30),
        "the watch no longer counted",
        || (watches(&b) == 0).then_some(()),
    );
    // Reading them is a right, as `get` on the /metrics non-resource URL.
    let err = b.fails(&["get", "--raw", "/metrics", "--as=nobody"], None);
    assert!(
        err.contains("forbidden") || err.contains("Forbidden"),
        "{err}"
    );
}
