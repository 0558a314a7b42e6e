//! Access control with the real kubectl against `baton up`: a teammate's kubeconfig from
//! `baton kubeconfig`, granted `view` in one namespace, sees what Kubernetes would let
//! them see and `kubectl auth can-i` agrees; the escalation check refuses a Role beyond
//! its creator; `kubectl create token` gives a ServiceAccount token that works.

#[path = "support/baton.rs"]
mod baton;

use std::time::Duration;

use baton::{guests_dir, http_get, jsonpath, write, Baton};

/// A teammate's kubeconfig, made as the README tells.
fn teammate(b: &Baton, user: &str, ns: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args([
            "kubeconfig",
            "--user",
            user,
            "--namespace",
            ns,
            "--data-dir",
        ])
        .arg(b.dir.path().join("data"))
        .output()
        .expect("baton kubeconfig");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = write(
        b.dir.path(),
        &format!("{user}.kubeconfig"),
        &String::from_utf8_lossy(&out.stdout),
    );
    format!("--kubeconfig={}", path.display())
}

/// `kubectl auth can-i` as `kc` (or the admin acting `--as`): yes or no.
fn can_i(b: &Baton, args: &[&str]) -> bool {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    let out = b.run("kubectl", &all, None);
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match said.as_str() {
        "yes" => true,
        "no" => false,
        _ => panic!(
            "kubectl {all:?}: {said} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn a_teammate_with_view_in_one_namespace_sees_what_kubernetes_would_show() {
    let b = Baton::start();
    b.ok(&["create", "namespace", "team-a"]);
    b.ok(&["create", "namespace", "team-b"]);
    b.ok(&[
        "create",
        "secret",
        "generic",
        "s",
        "--from-literal=k=v",
        "-n",
        "team-a",
    ]);
    b.ok(&[
        "create",
        "configmap",
        "c",
        "--from-literal=k=v",
        "-n",
        "team-a",
    ]);
    let alice = teammate(&b, "alice", "team-a");
    // Authenticated by the certificate, but granted nothing yet.
    let who = b.ok(&[&alice, "auth", "whoami"]);
    assert!(
        who.contains("alice") && who.contains("system:authenticated"),
        "{who}"
    );
    let err = b.fails(&[&alice, "get", "configmaps"], None);
    assert!(err.contains(r#"User "alice" cannot list resource "configmaps" in API group "" in the namespace "team-a""#), "{err}");

    b.ok(&[
        "create",
        "rolebinding",
        "alice-view",
        "--clusterrole=view",
        "--user=alice",
        "-n",
        "team-a",
    ]);
    baton::wait_until(
        std::time::Duration::from_secs(10),
        "the binding to take effect",
        || {
            b.run("kubectl", &[&alice, "get", "configmaps"], None)
                .status
                .success()
                .then_some(())
        },
    );
    let cms = b.ok(&[&alice, "get", "configmaps", "-o", "name"]);
    assert!(cms.contains("configmap/c"), "{cms}");
    b.ok(&[&alice, "get", "pods,deployments,services"]);
    let err = b.fails(&[&alice, "get", "secrets"], None);
    assert!(err.contains(r#"secrets is forbidden: User "alice" cannot list resource "secrets" in API group "" in the namespace "team-a""#), "{err}");
    let err = b.fails(&[&alice, "get", "secret", "s"], None);
    assert!(err.contains(r#"secrets "s" is forbidden"#), "{err}");
    let err = b.fails(&[&alice, "get", "pods", "-n", "team-b"], None);
    assert!(err.contains(r#"in the namespace "team-b""#), "{err}");
    let err = b.fails(&[&alice, "get", "nodes"], None);
    assert!(err.contains("at the cluster scope"), "{err}");
    let err = b.fails(&[&alice, "delete", "configmap", "c"], None);
    assert!(err.contains("cannot delete resource"), "{err}");

    // can-i agrees in every case, asked by alice and by the admin acting as her.
    for (args, want) in [
        (vec!["list", "pods"], true),
        (vec!["get", "configmaps/c"], true),
        (vec!["watch", "deployments.apps"], true),
        (vec!["list", "secrets"], false),
        (vec!["get", "secrets/s"], false),
        (vec!["delete", "configmaps/c"], false),
        (vec!["list", "pods", "-n", "team-b"], false),
        (vec!["list", "nodes"], false),
    ] {
        let mut as_alice = vec![alice.as_str()];
        as_alice.extend(args.iter().copied());
        assert_eq!(can_i(&b, &as_alice), want, "alice: can-i {args:?}");
        let mut impersonated = args.clone();
        impersonated.extend(["--as", "alice"]);
        if !impersonated.contains(&"-n") {
            impersonated.extend(["-n", "team-a"]);
        }
        assert_eq!(can_i(&b, &impersonated), want, "--as alice: can-i {args:?}");
    }
    let list = b.ok(&[&alice, "auth", "can-i", "--list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("pods ") && l.contains("list")),
        "{list}"
    );
    assert!(!list.lines().any(|l| l.starts_with("secrets ")), "{list}");
    // Impersonation needs its own grant.
    let err = b.fails(&[&alice, "get", "pods", "--as", "admin"], None);
    assert!(
        err.contains(r#"cannot impersonate resource "users""#),
        "{err}"
    );
}

#[test]
fn roles_beyond_their_creator_are_refused_and_tokens_work() {
    let b = Baton::start();
    b.ok(&["create", "namespace", "team-a"]);
    let bob = teammate(&b, "bob", "team-a");
    b.ok(&[
        "create",
        "rolebinding",
        "bob-admin",
        "--clusterrole=admin",
        "--user=bob",
        "-n",
        "team-a",
    ]);
    baton::wait_until(
        std::time::Duration::from_secs(10),
        "the binding to take effect",
        || {
            b.run("kubectl", &[&bob, "get", "roles"], None)
                .status
                .success()
                .then_some(())
        },
    );
    // admin in the namespace may hand out what it holds there...
    b.ok(&[
        &bob,
        "create",
        "role",
        "pod-reader",
        "--verb=get,list",
        "--resource=pods",
    ]);
    b.ok(&[
        &bob,
        "create",
        "rolebinding",
        "carol-reads",
        "--role=pod-reader",
        "--user=carol",
    ]);
    // ...but not what it does not.
    let err = b.fails(
        &[
            &bob,
            "create",
            "role",
            "node-reader",
            "--verb=get",
            "--resource=nodes",
        ],
        None,
    );
    assert!(
        err.contains("is attempting to grant RBAC permissions not currently held"),
        "{err}"
    );
    let err = b.fails(
        &[
            &bob,
            "create",
            "rolebinding",
            "carol-root",
            "--clusterrole=cluster-admin",
            "--user=carol",
        ],
        None,
    );
    assert!(
        err.contains("is attempting to grant RBAC permissions not currently held"),
        "{err}"
    );
    assert!(
        b.run(
            "kubectl",
            &["get", "role", "node-reader", "-n", "team-a"],
            None
        )
        .status
        .code()
            != Some(0)
    );
    // kubectl auth reconcile creates what is missing, as the admin.
    let reconciled = b.ok_with("kubectl", &["auth", "reconcile", "-f", "-"], Some(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: cm-reader, namespace: team-a}\nrules: [{apiGroups: [\"\"], resources: [configmaps], verbs: [get]}]\n",
    ));
    assert!(
        reconciled.contains("role.rbac.authorization.k8s.io/cm-reader reconciled"),
        "{reconciled}"
    );

    // A ServiceAccount token from kubectl create token acts as the account.
    b.ok(&["create", "serviceaccount", "robot", "-n", "team-a"]);
    let token = b.ok(&["create", "token", "robot", "-n", "team-a", "--duration=15m"]);
    let token = token.trim();
    let who = b.ok(&["--token", token, "auth", "whoami"]);
    assert!(who.contains("system:serviceaccount:team-a:robot"), "{who}");
    let err = b.fails(&["--token", token, "get", "pods", "-n", "team-a"], None);
    assert!(
        err.contains(r#"User "system:serviceaccount:team-a:robot" cannot list"#),
        "{err}"
    );
    b.ok(&["delete", "serviceaccount", "robot", "-n", "team-a"]);
    let err = b.fails(&["--token", token, "auth", "whoami"], None);
    assert!(
        err.contains("Unauthorized") || err.contains("must be logged in"),
        "{err}"
    );
}

#[test]
fn a_labelled_clusterrole_extends_the_roles_that_aggregate_it() {
    let b = Baton::start_cluster();
    b.ok(&["create", "namespace", "team-a"]);
    let alice = teammate(&b, "alice", "team-a");
    b.ok(&[
        "create",
        "rolebinding",
        "alice-view",
        "--clusterrole=view",
        "--user=alice",
        "-n",
        "team-a",
    ]);
    assert!(!can_i(&b, &[&alice, "list", "persistentvolumes"]));
    assert!(!can_i(&b, &[&alice, "list", "secrets"]));
    // What a CRD's installer does: a role labelled to be part of view.
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: secret-peeker\n  labels: {rbac.authorization.k8s.io/aggregate-to-view: \"true\"}\nrules: [{apiGroups: [\"\"], resources: [secrets], verbs: [list]}]\n",
    ));
    baton::wait_until(
        std::time::Duration::from_secs(30),
        "view to gather the new rule",
        || can_i(&b, &[&alice, "list", "secrets"]).then_some(()),
    );
    let view = b.ok(&[
        "get",
        "clusterrole",
        "view",
        "-o",
        "jsonpath={.rules[*].resources}",
    ]);
    assert!(view.contains("secrets"), "{view}");
    // edit and admin aggregate view's sources too.
    let admin = b.ok(&[
        "get",
        "clusterrole",
        "admin",
        "-o",
        "jsonpath={.rules[*].resources}",
    ]);
    assert!(admin.contains("secrets"), "{admin}");
    b.ok(&["delete", "clusterrole", "secret-peeker"]);
    baton::wait_until(
        std::time::Duration::from_secs(30),
        "view to drop the rule",
        || (!can_i(&b, &[&alice, "list", "secrets"])).then_some(()),
    );
}

#[test]
fn a_validating_admission_policy_denies_a_deployment_without_a_label() {
    let b = Baton::start();
    b.ok_with(
        "kubectl",
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: require-team}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [apps]
      apiVersions: [v1]
      operations: [CREATE, UPDATE]
      resources: [deployments]
  validations:
  - expression: "has(object.metadata.labels) && 'team' in object.metadata.labels"
    message: every Deployment needs a team label
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: require-team}
spec:
  policyName: require-team
  validationActions: [Deny]
"#,
        ),
    );
    let listed = b.ok(&["get", "validatingadmissionpolicies"]);
    assert!(listed.contains("require-team"), "{listed}");
    let err = baton::wait_until(
        std::time::Duration::from_secs(10),
        "the policy to take effect",
        || {
            let out = b.run(
                "kubectl",
                &[
                    "create",
                    "deployment",
                    "web",
                    "--image=registry.local/app:1",
                ],
                None,
            );
            if out.status.success() {
                b.ok(&["delete", "deployment", "web"]);
                return None;
            }
            Some(String::from_utf8_lossy(&out.stderr).into_owned())
        },
    );
    assert!(
        err.contains("ValidatingAdmissionPolicy 'require-team' with binding 'require-team' denied request: every Deployment needs a team label"),
        "{err}"
    );
    let labelled = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, labels: {team: a}}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, image: registry.local/app:1}]}\n";
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(labelled));
}

/// A kubeconfig for node `name`, with the client certificate the API server issues a
/// joining node (what `baton node` does before it starts).
fn node_kubeconfig(b: &Baton, name: &str) -> String {
    let body = write(b.dir.path(), "usage.json", r#"{"usage": "client"}"#);
    let answer = b.ok(&[
        "create",
        "--raw",
        &format!("/baton/v1/nodes/{name}/certificate"),
        "-f",
        &body.display().to_string(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    let admin = std::fs::read_to_string(&b.kubeconfig).unwrap();
    let server = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .unwrap()
        .to_string();
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let kc = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: baton\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: node\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: baton\n  context: {{cluster: baton, user: node}}\ncurrent-context: baton\n",
        b64(v["ca"].as_str().unwrap()),
        b64(v["certificate"].as_str().unwrap()),
        b64(v["key"].as_str().unwrap())
    );
    let path = write(b.dir.path(), &format!("{name}.kubeconfig"), &kc);
    format!("--kubeconfig={}", path.display())
}

#[test]
fn a_node_identity_reads_only_its_pods_secrets_and_writes_only_itself() {
    let b = Baton::start();
    let n9 = node_kubeconfig(&b, "n9");
    let who = b.ok(&[&n9, "auth", "whoami"]);
    assert!(
        who.contains("system:node:n9") && who.contains("system:nodes"),
        "{who}"
    );
    // A pod of another node, and its Secret.
    b.ok(&[
        "create",
        "secret",
        "generic",
        "theirs",
        "--from-literal=k=v",
    ]);
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(
        "apiVersion: v1\nkind: Node\nmetadata: {name: other}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  nodeName: other\n  containers: [{name: c, image: registry.local/app:1, envFrom: [{secretRef: {name: theirs}}]}]\n",
    ));
    let err = b.fails(&[&n9, "get", "secret", "theirs"], None);
    assert!(
        err.contains(r#"User "system:node:n9" cannot get resource "secrets""#),
        "{err}"
    );
    assert!(err.contains("no relationship found between node"), "{err}");
    let err = b.fails(&[&n9, "delete", "node", "other"], None);
    assert!(err.contains("cannot delete resource \"nodes\""), "{err}");
    // It may register itself, and read what every node reads.
    b.ok_with(
        "kubectl",
        &[&n9, "create", "-f", "-"],
        Some("apiVersion: v1\nkind: Node\nmetadata: {name: n9}\n"),
    );
    let err = b.fails(
        &[&n9, "create", "-f", "-"],
        Some("apiVersion: v1\nkind: Node\nmetadata: {name: n10}\n"),
    );
    assert!(err.contains("not allowed to create a Node named"), "{err}");
    b.ok(&[&n9, "get", "pods", "-A"]);
    // And it may not ask for another node's certificate.
    let err = b.fails(
        &[
            &n9,
            "create",
            "--raw",
            "/baton/v1/nodes/other/certificate",
            "-f",
            &write(b.dir.path(), "u.json", r#"{"usage": "client"}"#)
                .display()
                .to_string(),
        ],
        None,
    );
    assert!(
        err.contains("Forbidden") || err.contains("forbidden"),
        "{err}"
    );
}

/// The ServiceAccount token the node wrote into pod `pod`'s projected volume.
fn projected_token(b: &Baton, ns: &str, pod: &str) -> String {
    let uid = jsonpath(b, &["pod", pod, "-n", ns], "{.metadata.uid}");
    let volumes = b.dir.path().join(format!("data/node/pods/{uid}/volumes"));
    let dir = std::fs::read_dir(&volumes)
        .unwrap_or_else(|e| panic!("{}: {e}", volumes.display()))
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("kube-api-access-")
        })
        .expect("the pod's kube-api-access volume");
    std::fs::read_to_string(dir.path().join("token")).expect("the token file")
}

#[test]
fn a_wasm_guest_lists_pods_through_the_kubernetes_service_with_its_projected_token() {
    let b = Baton::start_cluster();
    let lister = guests_dir().join("kube-lister.wasm");
    let pod = |ns: &str, name: &str, automount: bool| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  automountServiceAccountToken: {automount}\n  containers:\n  - {{name: app, image: {}, ports: [{{containerPort: 8080}}]}}\n",
            lister.display()
        )
    };
    let manifest = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: apps}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: others}}\n---\n\
apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: pod-reader, namespace: apps}}\nrules:\n- {{apiGroups: [\"\"], resources: [pods], verbs: [get, list]}}\n---\n\
apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: default-reads-pods, namespace: apps}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}}\nsubjects:\n- {{kind: ServiceAccount, name: default, namespace: apps}}\n---\n{}---\n{}---\n{}",
        pod("apps", "lister", true),
        pod("others", "unbound", true),
        pod("apps", "opted-out", false),
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&manifest));
    for (ns, p) in [
        ("apps", "lister"),
        ("others", "unbound"),
        ("apps", "opted-out"),
    ] {
        b.ok(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{p}"),
            "-n",
            ns,
            "--timeout=90s",
        ]);
    }
    // The ServiceAccount plugin mounted the token, the CA and the namespace.
    let mounts = jsonpath(
        &b,
        &["pod", "lister", "-n", "apps"],
        "{.spec.volumes[0].name} {.spec.containers[0].volumeMounts[0].mountPath}",
    );
    assert!(
        mounts.starts_with("kube-api-access-")
            && mounts.ends_with(" /var/run/secrets/kubernetes.io/serviceaccount"),
        "{mounts}"
    );
    let ca = jsonpath(
        &b,
        &["configmap", "kube-root-ca.crt", "-n", "others"],
        "{.data.ca\\.crt}",
    );
    assert!(ca.contains("BEGIN CERTIFICATE"), "{ca}");
    let ask = |ns: &str, name: &str| {
        let ip = jsonpath(&b, &["pod", name, "-n", ns], "{.status.podIP}");
        http_get(format!("{ip}:8080").parse().unwrap(), "/").map(|(_, body)| body)
    };
    // The guest calls https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT as the
    // pod's ServiceAccount, verifying the API server with the projected CA.
    let mut last = String::new();
    let seen = baton_testkit::wait_until(Duration::from_secs(30), "the guest lists pods", || {
        last = format!("{:?}", ask("apps", "lister"));
        ask("apps", "lister")
            .ok()
            .filter(|s| s.starts_with("status 200"))
    })
    .unwrap_or_else(|e| panic!("{e}; the guest said {last}"));
    assert!(
        seen.contains("lister") && seen.contains("opted-out"),
        "{seen}"
    );
    // Another namespace's ServiceAccount was granted nothing: the API says 403.
    let denied = ask("others", "unbound").unwrap();
    assert!(denied.starts_with("status 403"), "{denied}");
    // A pod that opted out has no token to send.
    let none = ask("apps", "opted-out").unwrap();
    assert!(none.starts_with("no service account files"), "{none}");

    // The token is bound to its pod: it works while the pod lives, and not after.
    let token = projected_token(&b, "apps", "lister");
    let (code, _) = b.curl(
        "GET",
        "/api/v1/namespaces/apps/pods",
        "application/json",
        None,
        Some(token.trim()),
    );
    assert_eq!(code, 200);
    b.ok(&["delete", "pod", "lister", "-n", "apps", "--wait=true"]);
    let (code, body) = b.curl(
        "GET",
        "/api/v1/namespaces/apps/pods",
        "application/json",
        None,
        Some(token.trim()),
    );
    assert_eq!(code, 401, "{body}");
}

/// Runs openssl in `dir`; panics with its words if it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a serving certificate it signed for `dns`: (ca.crt, tls.crt, tls.key) paths.
fn serving_certificate(dir: &std::path::Path, dns: &str) -> [std::path::PathBuf; 3] {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=webhook-ca",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    let subj = format!("/CN={dns}");
    csr.extend(["-keyout", "tls.key", "-out", "tls.csr", "-subj", &subj]);
    openssl(dir, &csr);
    write(dir, "san.ext", &format!("subjectAltName=DNS:{dns}\n"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "tls.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    );
    ["ca.crt", "tls.crt", "tls.key"].map(|f| dir.join(f))
}

#[test]
fn a_mutating_webhook_served_by_a_wasm_component_labels_what_is_created() {
    use base64::Engine;
    let b = Baton::start_cluster();
    let certs = b.dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let [ca, crt, key] = serving_certificate(&certs, "labeller.webhooks.svc");
    b.ok(&["create", "namespace", "webhooks"]);
    b.ok(&[
        "create",
        "secret",
        "tls",
        "labeller-tls",
        "-n",
        "webhooks",
        &format!("--cert={}", crt.display()),
        &format!("--key={}", key.display()),
    ]);
    // The component serves HTTPS with the Secret's certificate: the node terminates TLS.
    let server = format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: labeller
  namespace: webhooks
  labels: {{app: labeller}}
  annotations: {{baton.dev/tls-volume: certs}}
spec:
  volumes: [{{name: certs, secret: {{secretName: labeller-tls}}}}]
  containers:
  - name: webhook
    image: {}
    ports: [{{containerPort: 8443}}]
    env: [{{name: LABEL_KEY, value: example.com/mutated-by}}, {{name: LABEL_VALUE, value: wasm}}]
    volumeMounts: [{{name: certs, mountPath: /certs, readOnly: true}}]
---
apiVersion: v1
kind: Service
metadata: {{name: labeller, namespace: webhooks}}
spec:
  selector: {{app: labeller}}
  ports: [{{port: 443, targetPort: 8443}}]
"#,
        guests_dir().join("admission-labeller.wasm").display()
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&server));
    b.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/labeller",
        "-n",
        "webhooks",
        "--timeout=90s",
    ]);
    let bundle = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&ca).unwrap());
    // A webhook nobody answers: the handshake never finishes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("https://127.0.0.1:{}/", silent.local_addr().unwrap().port());
    let hooks = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: labeller}}
webhooks:
- name: labeller.baton.test
  clientConfig:
    service: {{namespace: webhooks, name: labeller, path: /mutate}}
    caBundle: {bundle}
  rules: [{{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [configmaps]}}]
  namespaceSelector: {{matchLabels: {{webhook: "on"}}}}
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 10
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: silent}}
webhooks:
- name: ignored.silent.baton.test
  clientConfig: {{url: "{silent_url}", caBundle: {bundle}}}
  rules: [{{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [configmaps]}}]
  namespaceSelector: {{matchLabels: {{slow: ignore}}}}
  failurePolicy: Ignore
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 1
- name: failing.silent.baton.test
  clientConfig: {{url: "{silent_url}", caBundle: {bundle}}}
  rules: [{{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [configmaps]}}]
  namespaceSelector: {{matchLabels: {{slow: fail}}}}
  failurePolicy: Fail
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 1
"#
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&hooks));
    let listed = b.ok(&[
        "get",
        "mutatingwebhookconfigurations,validatingwebhookconfigurations",
    ]);
    assert!(
        listed.contains("labeller") && listed.contains("silent"),
        "{listed}"
    );
    for (ns, label) in [
        ("labelled", "webhook=on"),
        ("plain", "webhook=off"),
        ("slow-ignore", "slow=ignore"),
        ("slow-fail", "slow=fail"),
    ] {
        b.ok(&["create", "namespace", ns]);
        b.ok(&["label", "namespace", ns, label]);
    }
    // The component's patch labels what it is sent; the namespaceSelector picks what.
    b.ok(&[
        "create",
        "configmap",
        "c",
        "-n",
        "labelled",
        "--from-literal=k=v",
    ]);
    let label = |ns: &str| {
        jsonpath(
            &b,
            &["configmap", "c", "-n", ns],
            "{.metadata.labels.example\\.com/mutated-by}",
        )
    };
    assert_eq!(label("labelled"), "wasm");
    b.ok(&[
        "create",
        "configmap",
        "c",
        "-n",
        "plain",
        "--from-literal=k=v",
    ]);
    assert_eq!(label("plain"), "");
    // Its refusal comes back in kube's words.
    let refused = b.fails(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: r, namespace: labelled, labels: {reject: \"true\"}}\n"),
    );
    assert!(
        refused.contains(r#"admission webhook "labeller.baton.test" denied the request: the object asked to be rejected"#),
        "{refused}"
    );
    // A webhook that times out is passed over with failurePolicy Ignore...
    b.ok(&[
        "create",
        "configmap",
        "c",
        "-n",
        "slow-ignore",
        "--from-literal=k=v",
    ]);
    // ...and refuses the write with Fail.
    let failed = b.fails(
        &[
            "create",
            "configmap",
            "c",
            "-n",
            "slow-fail",
            "--from-literal=k=v",
        ],
        None,
    );
    assert!(
        failed.contains(r#"failed calling webhook "failing.silent.baton.test""#)
            && failed.contains("deadline exceeded"),
        "{failed}"
    );
    b.fails(&["get", "configmap", "c", "-n", "slow-fail"], None);
    drop(silent);
}

#[test]
fn pod_security_levels_refuse_and_warn_as_kubernetes_does() {
    let b = Baton::start();
    b.ok(&["create", "namespace", "tenant"]);
    b.ok(&[
        "label",
        "namespace",
        "tenant",
        "pod-security.kubernetes.io/enforce=baseline",
        "pod-security.kubernetes.io/warn=restricted",
    ]);
    let apply = |manifest: &str| b.run("kubectl", &["apply", "-f", "-"], Some(manifest));
    // What reaches the node breaks baseline: refused, in kube's words.
    let out = apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: nosy, namespace: tenant}\nspec:\n  volumes: [{name: etc, hostPath: {path: /etc}}]\n  containers: [{name: app, image: registry.local/app:1}]\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(r#"pods "nosy" is forbidden: violates PodSecurity "baseline:latest": hostPath volumes (volume "etc")"#),
        "{err}"
    );
    // A plain pod meets baseline and is created, with restricted's warning.
    let out = apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: plain, namespace: tenant}\nspec:\n  containers: [{name: app, image: registry.local/app:1}]\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(r#"Warning: would violate PodSecurity "restricted:latest": allowPrivilegeEscalation != false"#),
        "{err}"
    );
    // A Deployment's template is never refused, but warned of at the enforced level.
    let out = apply(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: host, namespace: tenant}\nspec:\n  selector: {matchLabels: {app: host}}\n  template:\n    metadata: {labels: {app: host}}\n    spec:\n      hostNetwork: true\n      containers: [{name: app, image: registry.local/app:1}]\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(r#"would violate PodSecurity "restricted:latest""#)
            && err.contains("host namespaces (hostNetwork=true)"),
        "{err}"
    );
    // A namespace without labels is privileged: no check, no warning.
    let out = b.run(
        "kubectl",
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata: {name: free, namespace: default}\nspec:\n  hostNetwork: true\n  containers: [{name: app, image: registry.local/app:1}]\n"),
    );
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("PodSecurity"));
}

#[test]
fn a_policy_with_the_warn_action_warns_the_client_and_lets_the_write_through() {
    let b = Baton::start();
    b.ok_with(
        "kubectl",
        &["apply", "-f", "-"],
        Some(
            r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: small-configmaps}
spec:
  matchConstraints:
    resourceRules:
    - {apiGroups: [""], apiVersions: [v1], operations: [CREATE], resources: [configmaps]}
  validations:
  - expression: "!has(object.data) || size(object.data) < 2"
    message: keep ConfigMaps small
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: small-configmaps}
spec:
  policyName: small-configmaps
  validationActions: [Warn]
"#,
        ),
    );
    let err = baton::wait_until(
        std::time::Duration::from_secs(10),
        "the policy to take effect",
        || {
            let name = format!("c{}", rand::random::<u32>());
            let out = b.run(
                "kubectl",
                &[
                    "create",
                    "configmap",
                    &name,
                    "--from-literal=a=1",
                    "--from-literal=b=2",
                ],
                None,
            );
            assert!(out.status.success(), "Warn never refuses");
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            err.contains("Warning").then_some(err)
        },
    );
    assert!(
        err.contains("Validation failed for ValidatingAdmissionPolicy 'small-configmaps' with binding 'small-configmaps': keep ConfigMaps small"),
        "{err}"
    );
}

/// Approving a CertificateSigningRequest takes the `approve` verb on its signer, as in
/// Kubernetes: a user who may only update approvals cannot approve their own request for
/// an API client certificate naming `system:masters`, and so cannot make themselves an
/// administrator. Granted `approve` on the signer's domain, they can.
#[test]
fn approving_a_csr_takes_approve_on_its_signer() {
    let b = Baton::start();
    let mallory = teammate(&b, "mallory", "default");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mallory-admin");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:masters");
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    use base64::Engine as _;
    let request = base64::engine::general_purpose::STANDARD.encode(csr);
    let manifest = format!(
        "apiVersion: certificates.k8s.io/v1
kind: CertificateSigningRequest
metadata:
  name: mallory-admin
spec:
  signerName: kubernetes.io/kube-apiserver-client
  usages: [client auth]
  request: {request}
"
    );
    let role = "apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: csr-approver
rules:
- apiGroups: [certificates.k8s.io]
  resources: [certificatesigningrequests]
  verbs: [create, get, list, watch]
- apiGroups: [certificates.k8s.io]
  resources: [certificatesigningrequests/approval]
  verbs: [update]
";
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(role));
    b.ok(&[
        "create",
        "clusterrolebinding",
        "mallory-approves",
        "--clusterrole=csr-approver",
        "--user=mallory",
    ]);
    baton::wait_until(
        Duration::from_secs(10),
        "the binding to take effect",
        || {
            b.run("kubectl", &[&mallory, "get", "csr"], None)
                .status
                .success()
                .then_some(())
        },
    );
    b.ok_with("kubectl", &[&mallory, "apply", "-f", "-"], Some(&manifest));
    let err = b.fails(&[&mallory, "certificate", "approve", "mallory-admin"], None);
    assert!(
        err.contains(
            "cannot approve signers.certificates.k8s.io \"kubernetes.io/kube-apiserver-client\""
        ),
        "{err}"
    );
    let conditions = jsonpath(&b, &["csr", "mallory-admin"], "{.status.conditions}");
    assert!(conditions.is_empty(), "{conditions}");
    // Denying is deciding too.
    let err = b.fails(&[&mallory, "certificate", "deny", "mallory-admin"], None);
    assert!(err.contains("cannot approve signers"), "{err}");

    let grant = format!(
        "{role}- apiGroups: [certificates.k8s.io]
  resources: [signers]
  resourceNames: [kubernetes.io/*]
  verbs: [approve]
"
    );
    b.ok_with("kubectl", &["apply", "-f", "-"], Some(&grant));
    baton::wait_until(
        Duration::from_secs(10),
        "the approval to go through",
        || {
            b.run(
                "kubectl",
                &[&mallory, "certificate", "approve", "mallory-admin"],
                None,
            )
            .status
            .success()
            .then_some(())
        },
    );
    let approved = jsonpath(
        &b,
        &["csr", "mallory-admin"],
        "{.status.conditions[0].type}",
    );
    assert_eq!(approved, "Approved");
}
