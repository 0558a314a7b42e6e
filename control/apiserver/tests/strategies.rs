//! What differs by kind, through the router in process: each resource's strategy at work
//! (defaults, allocations, updates, deletion, printing, field selectors), bodies that
//! leave their kind to the URL, and the one compare-and-swap loop every change goes
//! through.

mod support;

use axum::http::StatusCode;
use serde_json::{json, Value};
use support::env;

const SVCS: &str = "/api/v1/namespaces/default/services";

fn svc(name: &str, ip: Option<&str>) -> Value {
    let mut s = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
        "spec": {"type": "NodePort", "ports": [{"port": 80}]}});
    if let Some(ip) = ip {
        s["spec"]["clusterIP"] = json!(ip);
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_without_kind_or_api_version_takes_them_from_the_url() {
    let e = env().await;
    let (code, got) = e
        .json(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            Some(json!({"metadata": {"name": "bare"}, "data": {"a": "1"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{got}");
    assert_eq!(
        (got["kind"].as_str(), got["apiVersion"].as_str()),
        (Some("ConfigMap"), Some("v1"))
    );
    let (code, got) = e
        .json(
            "POST",
            "/apis/apps/v1/namespaces/default/deployments",
            Some(json!({"kind": "ConfigMap", "metadata": {"name": "wrong"}})),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{got}");
    assert!(
        got["message"].as_str().unwrap().contains("do not match"),
        "{got}"
    );
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_address_is_its_own_until_it_is_deleted() {
    let e = env().await;
    let (code, a) = e.json("POST", SVCS, Some(svc("a", None))).await;
    assert_eq!(code, StatusCode::CREATED, "{a}");
    let ip = a["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.96."), "{ip}");
    let node_port = a["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
    assert!((30000..=32767).contains(&node_port));
    // Taken: another Service cannot have it, and an update cannot change it.
    let (code, b) = e.json("POST", SVCS, Some(svc("b", Some(&ip)))).await;
    assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let mut changed = a.clone();
    changed["spec"]["clusterIP"] = json!("10.96.9.9");
    let (code, updated) = e.json("PUT", &format!("{SVCS}/a"), Some(changed)).await;
    assert_eq!(code, StatusCode::OK, "{updated}");
    assert_eq!(updated["spec"]["clusterIP"], ip.as_str());
    // Given back with the Service.
    let (code, _) = e.json("DELETE", &format!("{SVCS}/a"), None).await;
    assert_eq!(code, StatusCode::OK);
    let (code, b) = e.json("POST", SVCS, Some(svc("b", Some(&ip)))).await;
    assert_eq!(code, StatusCode::CREATED, "{b}");
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_fold_string_data_on_every_write() {
    let e = env().await;
    let uri = "/api/v1/namespaces/default/secrets";
    let (code, s) = e
        .json(
            "POST",
            uri,
            Some(
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                "stringData": {"a": "x"}}),
            ),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{s}");
    assert_eq!(s["data"]["a"], "eA==");
    assert_eq!(s["type"], "Opaque");
    assert!(s.get("stringData").is_none());
    let mut upd = s.clone();
    upd["stringData"] = json!({"b": "y"});
    let (code, s) = e.json("PUT", &format!("{uri}/s"), Some(upd)).await;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(
        (s["data"]["a"].as_str(), s["data"]["b"].as_str()),
        (Some("eA=="), Some("eQ=="))
    );
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_proceed_as_their_kind_says() {
    let e = env().await;
    let pods = "/api/v1/namespaces/default/pods";
    let pod = |name: &str, node: Option<&str>| {
        let mut p = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "x"}]}});
        if let Some(n) = node {
            p["spec"]["nodeName"] = json!(n);
        }
        p
    };
    // A pod no node runs goes at once; a pod on a node waits for its node.
    let (code, _) = e.json("POST", pods, Some(pod("free", None))).await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, _) = e.json("DELETE", &format!("{pods}/free"), None).await;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = e.json("POST", pods, Some(pod("bound", Some("n1")))).await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, marked) = e.json("DELETE", &format!("{pods}/bound"), None).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{marked}");
    assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 30);
    // Through its grace period the pod stays: its node's status reports, and a second
    // deletion asking for no shorter period, keep it as it is.
    let bound = format!("{pods}/bound");
    let (code, _) = e
        .json_patch(
            &format!("{bound}/status"),
            json!({"status": {"phase": "Running"}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let (code, again) = e.json("DELETE", &bound, None).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["metadata"]["deletionGracePeriodSeconds"], 30);
    assert_eq!(e.json("GET", &bound, None).await.0, StatusCode::OK);
    // A shorter period moves the deadline; 0 (the node, once its containers stopped)
    // removes the pod, and says so with a 200.
    let (code, shorter) = e
        .json("DELETE", &format!("{bound}?gracePeriodSeconds=5"), None)
        .await;
    assert_eq!(code, StatusCode::ACCEPTED, "{shorter}");
    assert_eq!(shorter["metadata"]["deletionGracePeriodSeconds"], 5);
    let (code, gone) = e
        .json("DELETE", &format!("{bound}?gracePeriodSeconds=0"), None)
        .await;
    assert_eq!(code, StatusCode::OK, "{gone}");
    assert_eq!(e.json("GET", &bound, None).await.0, StatusCode::NOT_FOUND);
    // A pod that has ended goes at once, on a node or not.
    let (code, _) = e.json("POST", pods, Some(pod("ended", Some("n1")))).await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, _) = e
        .json_patch(
            &format!("{pods}/ended/status"),
            json!({"status": {"phase": "Succeeded"}}),
        )
        .await;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = e.json("DELETE", &format!("{pods}/ended"), None).await;
    assert_eq!(code, StatusCode::OK);
    // A finalizer holds a pod past its grace period; the update that drops the last one
    // once the period is over removes it.
    let mut held = pod("held", Some("n1"));
    held["metadata"]["finalizers"] = json!(["example.com/hold"]);
    let (code, _) = e.json("POST", pods, Some(held)).await;
    assert_eq!(code, StatusCode::CREATED);
    let held = format!("{pods}/held");
    let (code, _) = e
        .json("DELETE", &format!("{held}?gracePeriodSeconds=0"), None)
        .await;
    assert_eq!(code, StatusCode::ACCEPTED);
    assert_eq!(e.json("GET", &held, None).await.0, StatusCode::OK);
    let (code, _) = e
        .json_patch(&held, json!({"metadata": {"finalizers": null}}))
        .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(e.json("GET", &held, None).await.0, StatusCode::NOT_FOUND);
    // A namespace shows Terminating while it is emptied.
    let (code, _) = e
        .json(
            "POST",
            "/api/v1/namespaces",
            Some(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gone"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED);
    let (code, ns) = e.json("DELETE", "/api/v1/namespaces/gone", None).await;
    assert_eq!(code, StatusCode::ACCEPTED, "{ns}");
    assert_eq!(ns["status"]["phase"], "Terminating");
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_prints_its_columns_and_selects_its_fields() {
    let e = env().await;
    let (code, table) = e
        .json_with(
            "GET",
            "/api/v1/namespaces",
            "application/json;as=Table;v=v1;g=meta.k8s.io",
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{table}");
    let names: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Name", "Status", "Age"]);
    let row = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cells"][0] == "default")
        .unwrap();
    assert_eq!(row["cells"][1], "Active");
    let (code, _) = e
        .json("GET", "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1", None)
        .await;
    assert_eq!(code, StatusCode::OK);
    let (code, err) = e
        .json(
            "GET",
            "/api/v1/configmaps?fieldSelector=spec.nodeName%3Dn1",
            None,
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{err}");
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("field label not supported"));
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_holds_nothing_and_concurrent_creates_never_share_a_value() {
    let e = env().await;
    let (code, a) = e.json("POST", SVCS, Some(svc("a", None))).await;
    assert_eq!(code, StatusCode::CREATED, "{a}");
    // The same name again, asking for an address: refused, and the address stays free.
    let wanted = "10.96.200.7";
    let (code, again) = e.json("POST", SVCS, Some(svc("a", Some(wanted)))).await;
    assert_eq!(code, StatusCode::CONFLICT, "{again}");
    let key = format!("/registry/ranges/serviceips/{wanted}");
    let held = e
        .store
        .get(key.as_bytes(), Default::default())
        .await
        .unwrap();
    assert!(held.is_none(), "a refused create holds {wanted}");
    // Many at once: every address and node port is one Service's.
    let creates = (0..24).map(|i| e.json("POST", SVCS, Some(svc(&format!("s{i}"), None))));
    let made = futures::future::join_all(creates).await;
    let mut ips = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    for (code, s) in &made {
        assert_eq!(*code, StatusCode::CREATED, "{s}");
        assert!(ips.insert(s["spec"]["clusterIP"].to_string()), "{s}");
        assert!(
            ports.insert(s["spec"]["ports"][0]["nodePort"].to_string()),
            "{s}"
        );
    }
    e.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patches_all_land_and_preconditions_are_not_retried() {
    let e = env().await;
    let uri = "/api/v1/namespaces/default/configmaps";
    let (code, cm) = e
        .json(
            "POST",
            uri,
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})),
        )
        .await;
    assert_eq!(code, StatusCode::CREATED, "{cm}");
    // Sixteen writers at once: each read-modify-write that loses the race starts over.
    let one = format!("{uri}/c");
    let patches = (0..16).map(|i| {
        let body = json!({"metadata": {"labels": {format!("l{i}"): "x"}}});
        e.json_patch(&one, body)
    });
    for (code, got) in futures::future::join_all(patches).await {
        assert_eq!(code, StatusCode::OK, "{got}");
    }
    let (_, got) = e.json("GET", &format!("{uri}/c"), None).await;
    assert_eq!(
        got["metadata"]["labels"].as_object().unwrap().len(),
        16,
        "{got}"
    );
    // A stale resourceVersion is a conflict at once, not after retries.
    let stale = json!({"metadata": {"resourceVersion": "1", "labels": {"z": "z"}}});
    let (code, err) = e.json_patch(&format!("{uri}/c"), stale).await;
    assert_eq!(code, StatusCode::CONFLICT, "{err}");
    e.close().await;
}

/// A CertificateSigningRequest's approval takes a patch as well as an update, as
/// kube-apiserver's `/approval` does, and a patch there changes only the conditions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_is_approved_by_a_patch_of_its_approval() {
    use base64::Engine as _;
    let e = env().await;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "system:node:n1");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    let key = rcgen::KeyPair::generate().unwrap();
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let csr = json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": "n1"},
        "spec": {"request": base64::engine::general_purpose::STANDARD.encode(pem),
            "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
            "usages": ["digital signature", "key encipherment", "client auth"]}});
    const CSRS: &str = "/apis/certificates.k8s.io/v1/certificatesigningrequests";
    let (code, created) = e.json("POST", CSRS, Some(csr)).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    let approve = json!({"spec": {"signerName": "other"}, "status": {"conditions": [
        {"type": "Approved", "status": "True", "reason": "Test", "message": "by a patch"}]}});
    let (code, approved) = e.json_patch(&format!("{CSRS}/n1/approval"), approve).await;
    assert_eq!(code, StatusCode::OK, "{approved}");
    assert_eq!(approved["status"]["conditions"][0]["type"], "Approved");
    assert_eq!(
        approved["spec"]["signerName"], "kubernetes.io/kube-apiserver-client-kubelet",
        "only the conditions change through /approval"
    );
    // A patch of its labels alone still meets the required spec the labels leave out.
    let labelled = json!({"metadata": {"labels": {"l": "1"}}});
    let (code, got) = e.json_patch(&format!("{CSRS}/n1"), labelled).await;
    assert_eq!(code, StatusCode::OK, "{got}");
    assert_eq!(got["metadata"]["labels"]["l"], "1");
    assert_eq!(
        got["spec"]["signerName"],
        "kubernetes.io/kube-apiserver-client-kubelet"
    );
    let (code, _) = e.json_patch(&format!("{CSRS}/n1/nope"), json!({})).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    e.close().await;
}

/// A patch is typed where it changes the object: unknown fields there are dropped, or
/// refused when validation is strict, values of the wrong type are refused, and what it
/// leaves alone stays as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_is_checked_where_it_changes_the_object() {
    let e = env().await;
    let pods = "/api/v1/namespaces/default/pods";
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "x"}]}});
    let (code, created) = e.json("POST", pods, Some(pod)).await;
    assert_eq!(code, StatusCode::CREATED, "{created}");
    let status = format!("{pods}/p/status");
    let (code, got) = e
        .json_patch(
            &format!("{status}?fieldValidation=Strict"),
            json!({"status": {"phase": "Running", "bogus": 1}}),
        )
        .await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{got}");
    assert!(
        got["message"].as_str().unwrap().contains("status.bogus"),
        "{got}"
    );
    let (code, got) = e.json_patch(&status, json!({"status": {"phase": 5}})).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{got}");
    let (code, got) = e
        .json_patch(&status, json!({"status": {"phase": "Running", "bogus": 1}}))
        .await;
    assert_eq!(code, StatusCode::OK, "{got}");
    assert_eq!(got["status"]["phase"], "Running");
    assert!(got["status"].get("bogus").is_none(), "{got}");
    assert_eq!(got["spec"], created["spec"]);
    let (code, got) = e
        .patch_as(
            &format!("{pods}/p"),
            "application/json-patch+json",
            json!([{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}]),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{got}");
    assert_eq!(got["metadata"]["labels"]["a"], "b");
    assert_eq!(
        (&got["spec"], &got["status"]["phase"]),
        (&created["spec"], &json!("Running"))
    );
    e.close().await;
}
