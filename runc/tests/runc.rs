//! Containers run by the real runc (Debian's), on a root filesystem of Debian's
//! busybox-static: output, exit codes, limits, signals, exec, and the sandbox's walls.
//! Needs root, as the node does.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use baton_runc::{ContainerConfig, ExecProcess, Runc, RuncError};
use tokio::io::AsyncReadExt;

/// A root filesystem holding busybox and a link per applet.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    for applet in [
        "sh", "echo", "cat", "sleep", "dd", "id", "grep", "unshare", "touch", "true", "ls", "stty",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    root
}

struct Lab {
    dir: tempfile::TempDir,
    runc: Runc,
    rootfs: PathBuf,
}

/// Container IDs and cgroups are node-wide: unique across the tests running together.
static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn lab() -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(dir.path());
    let runc = Runc::new(None, dir.path().join("state")).expect("runc is installed");
    Lab { dir, runc, rootfs }
}

impl Lab {
    fn config(&self, args: &[&str]) -> ContainerConfig {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("baton-test-{}-{n}", std::process::id());
        ContainerConfig {
            id: id.clone(),
            hostname: "box".into(),
            rootfs: self.rootfs.clone(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            no_new_privileges: true,
            cgroups_path: format!("/baton-test/{id}"),
            ..Default::default()
        }
    }

    /// Runs a container to its end: (exit code, stdout, stderr, runc's error, OOM-killed).
    async fn run(&self, cfg: &ContainerConfig) -> (i32, String, String, Option<String>, bool) {
        let bundle = self.dir.path().join(&cfg.id);
        cfg.write_bundle(&bundle).unwrap();
        let mut c = self
            .runc
            .run(
                &cfg.id,
                &bundle,
                Stdio::null(),
                Stdio::piped(),
                Stdio::piped(),
            )
            .unwrap();
        let (code, err) = within(c.wait()).await;
        let oom = self.runc.oom_killed(&cfg.cgroups_path);
        let (out, errout) = c.output().await;
        c.delete().await.unwrap();
        (code, out, errout, err, oom)
    }
}

/// Awaits something a test waits on, failing the test rather than hanging it.
async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("runc did not finish within 60 s")
}

trait Output {
    async fn output(&mut self) -> (String, String);
}

impl Output for baton_runc::Container {
    async fn output(&mut self) -> (String, String) {
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(mut o) = self.stdout() {
            o.read_to_string(&mut out).await.unwrap();
        }
        if let Some(mut e) = self.stderr() {
            e.read_to_string(&mut err).await.unwrap();
        }
        (out, err)
    }
}

#[tokio::test]
async fn output_and_exit_codes_come_back() {
    let lab = lab();
    let (code, out, _, err, _) = lab.run(&lab.config(&["echo", "hello", "runc"])).await;
    assert_eq!((code, out.as_str(), err), (0, "hello runc\n", None));
    let (code, _, errout, _, _) = lab
        .run(&lab.config(&["sh", "-c", "echo oops >&2; exit 3"]))
        .await;
    assert_eq!((code, errout.as_str()), (3, "oops\n"));
    // A command the image does not have: runc says so, and the container never ran.
    let (code, _, _, err, _) = lab.run(&lab.config(&["no-such-binary"])).await;
    assert_ne!(code, 0);
    let err = err.expect("runc reports why");
    assert!(err.contains("no-such-binary"), "{err}");
}

#[tokio::test]
async fn a_container_over_its_memory_limit_is_oom_killed() {
    let lab = lab();
    let mut cfg = lab.config(&["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]);
    cfg.memory_limit = Some(16 << 20);
    let (code, _, _, _, oom) = lab.run(&cfg).await;
    assert_eq!(code, 137);
    assert!(oom, "the cgroup counted an OOM kill");
    // Under the limit it runs.
    cfg.id.push_str("-small");
    cfg.cgroups_path.push_str("-small");
    cfg.args = ["dd", "if=/dev/zero", "of=/dev/null", "bs=1M", "count=1"]
        .map(String::from)
        .to_vec();
    let (code, _, _, _, oom) = lab.run(&cfg).await;
    assert_eq!((code, oom), (0, false));
}

#[tokio::test]
async fn term_stops_a_container_and_kill_stops_one_that_ignores_it() {
    let lab = lab();
    // A process that handles TERM ends on it; one that does not (a PID 1 ignores the
    // signals it has no handler for, as in any container) needs KILL.
    for (args, signal, want) in [
        (
            &[
                "sh",
                "-c",
                "trap 'exit 143' TERM; echo ready; while true; do sleep 1; done",
            ][..],
            "TERM",
            143,
        ),
        (&["sleep", "1000"][..], "KILL", 137),
    ] {
        let cfg = lab.config(args);
        let bundle = lab.dir.path().join(&cfg.id);
        cfg.write_bundle(&bundle).unwrap();
        let mut c = lab
            .runc
            .run(
                &cfg.id,
                &bundle,
                Stdio::null(),
                Stdio::piped(),
                Stdio::null(),
            )
            .unwrap();
        wait_running(&lab.runc, &cfg.id).await;
        if signal == "TERM" {
            // The trap is set once it says so.
            let mut line = [0u8; 6];
            within(c.stdout().unwrap().read_exact(&mut line))
                .await
                .unwrap();
        } else {
            lab.runc.kill(&cfg.id, "TERM").await.unwrap();
            let still = tokio::time::timeout(Duration::from_millis(500), c.wait()).await;
            assert!(
                still.is_err(),
                "a container that ignores TERM keeps running"
            );
        }
        lab.runc.kill(&cfg.id, signal).await.unwrap();
        let (code, _) = within(c.wait()).await;
        assert_eq!(code, want, "{args:?}");
        c.delete().await.unwrap();
        assert_eq!(lab.runc.state(&cfg.id).await.unwrap(), None);
    }
}

async fn wait_running(runc: &Runc, id: &str) {
    for _ in 0..500 {
        if let Ok(Some((status, _))) = runc.state(id).await {
            if status == "running" {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never ran");
}

#[tokio::test]
async fn exec_runs_in_the_container_with_its_exit_code() {
    let lab = lab();
    let cfg = lab.config(&["sleep", "1000"]);
    let bundle = lab.dir.path().join(&cfg.id);
    cfg.write_bundle(&bundle).unwrap();
    let c = lab
        .runc
        .run(
            &cfg.id,
            &bundle,
            Stdio::null(),
            Stdio::null(),
            Stdio::null(),
        )
        .unwrap();
    wait_running(&lab.runc, &cfg.id).await;
    let p = ExecProcess {
        args: ["sh", "-c", "hostname; exit 7"].map(String::from).to_vec(),
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    let out = lab
        .runc
        .exec(&cfg.id, &p, Stdio::null(), Stdio::piped(), Stdio::piped())
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "box\n");
    // On a terminal of the size asked for, which carries its output. runc sizes the
    // terminal it makes for the process from ours just after starting it, so the command
    // waits (a bounded while) until the size is there. It waits for the very size asked
    // for: in one CI run `stty size` once answered with nothing before runc had sized it.
    let p = ExecProcess {
        args: [
            "sh",
            "-c",
            "i=0; while [ $i -lt 50 ]; do s=$(stty size 2>/dev/null); [ \"$s\" = '30 100' ] && break; i=$((i+1)); sleep 0.1; done; echo \"$s\"; exit 5",
        ]
        .map(String::from)
        .to_vec(),
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    let (mut child, master) = lab.runc.exec_terminal(&cfg.id, &p, 100, 30).unwrap();
    let mut master = tokio::fs::File::from_std(master);
    let mut shown = Vec::new();
    // The command's side closes with it: the read then fails (EIO), not blocks.
    let _ = within(master.read_to_end(&mut shown)).await;
    assert_eq!(within(child.wait()).await.unwrap().code(), Some(5));
    assert!(
        String::from_utf8_lossy(&shown).contains("30 100"),
        "{:?}",
        String::from_utf8_lossy(&shown)
    );
    // A command that is not there: runc's words, on the terminal.
    let p = ExecProcess {
        args: vec!["no-such-command".into()],
        ..Default::default()
    };
    let (mut child, master) = lab.runc.exec_terminal(&cfg.id, &p, 80, 24).unwrap();
    let mut master = tokio::fs::File::from_std(master);
    let mut shown = Vec::new();
    let _ = within(master.read_to_end(&mut shown)).await;
    assert_ne!(within(child.wait()).await.unwrap().code(), Some(0));
    assert!(
        String::from_utf8_lossy(&shown).contains("no-such-command"),
        "{:?}",
        String::from_utf8_lossy(&shown)
    );
    // A dropped container is removed with its processes.
    drop(c);
    assert_eq!(lab.runc.state(&cfg.id).await.unwrap(), None);
}

#[tokio::test]
async fn the_sandbox_holds_read_only_root_capabilities_and_seccomp() {
    let lab = lab();
    // A read-only root filesystem refuses writes.
    let mut cfg = lab.config(&["touch", "/written"]);
    cfg.readonly_rootfs = true;
    let (code, _, errout, _, _) = lab.run(&cfg).await;
    assert_ne!(code, 0);
    assert!(errout.contains("Read-only file system"), "{errout}");
    assert!(!lab.rootfs.join("written").exists());
    // Dropping every capability leaves an empty bounding set.
    let mut cfg = lab.config(&["grep", "CapBnd", "/proc/self/status"]);
    cfg.capabilities_drop = vec!["ALL".into()];
    let (_, out, _, _, _) = lab.run(&cfg).await;
    assert!(out.contains("0000000000000000"), "{out}");
    // The default keeps NET_BIND_SERVICE but not SYS_ADMIN; RuntimeDefault refuses
    // unshare even so.
    let cfg = lab.config(&["unshare", "-m", "true"]);
    let (code, _, errout, _, _) = lab.run(&cfg).await;
    assert_ne!(code, 0, "{errout}");
    assert!(errout.contains("Operation not permitted"), "{errout}");
}

#[test]
fn a_missing_runc_is_named() {
    let err = Runc::new(Some("/nonexistent/runc".into()), "/tmp".into()).unwrap_err();
    assert!(matches!(err, RuncError::NotFound { .. }));
    assert!(err.to_string().contains("/nonexistent/runc"), "{err}");
    let cfg = ContainerConfig {
        capabilities_add: vec!["NOT_A_CAP".into()],
        args: vec!["true".into()],
        ..Default::default()
    };
    assert!(cfg.spec().unwrap_err().to_string().contains("NOT_A_CAP"));
    let empty = ContainerConfig::default();
    assert!(empty.spec().unwrap_err().to_string().contains("no command"));
}
