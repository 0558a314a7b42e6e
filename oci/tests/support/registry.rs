#![allow(dead_code)] // shared by test crates, each using a part
//! A real OCI registry (Debian's `docker-registry`, distribution 2.8) on 127.0.0.1, plain,
//! with htpasswd auth, or with TLS from a generated CA.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Registry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: String,
    /// The CA that signed a TLS registry's certificate (PEM).
    pub ca_pem: Option<Vec<u8>>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to run the registry.
#[derive(Default)]
pub struct Options {
    /// `(user, password)`: require them (htpasswd, bcrypt).
    pub user: Option<(String, String)>,
    pub tls: bool,
}

impl Registry {
    pub fn start(opts: Options) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        // Port 0: the registry binds one and logs it ("listening on ADDR", at info).
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n",
            dir.path().join("data").display()
        );
        let mut ca_pem = None;
        if opts.tls {
            let (ca, cert, key) = certificates();
            std::fs::write(dir.path().join("tls.crt"), cert).unwrap();
            std::fs::write(dir.path().join("tls.key"), key).unwrap();
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.path().join("tls.crt").display(),
                dir.path().join("tls.key").display()
            ));
            ca_pem = Some(ca);
        }
        if let Some((user, password)) = &opts.user {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils)");
            std::fs::write(dir.path().join("htpasswd"), out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: baton-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker-registry (Debian package docker-registry)");
        let log = child.stderr.take().unwrap();
        let addr =
            baton_testkit::process::announced_addr(log, "listening on ", Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("the registry did not start: {e}"))
                .to_string();
        Registry {
            child,
            dir,
            addr,
            ca_pem,
        }
    }

    /// The file a blob is stored in, to damage it on purpose.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// A CA, and a certificate for 127.0.0.1 it signed: (CA PEM, cert PEM, key PEM).
fn certificates() -> (Vec<u8>, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca.pem().into_bytes(), cert.pem(), key.serialize_pem())
}

/// Damages a file in place: `truncate` halves it, otherwise one byte is flipped.
pub fn damage(path: &Path, truncate: bool) {
    let mut data = std::fs::read(path).unwrap();
    if truncate {
        data.truncate(data.len() / 2);
    } else {
        let i = data.len() / 2;
        data[i] ^= 0xff;
    }
    std::fs::write(path, data).unwrap();
}
