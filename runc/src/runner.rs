//! Driving runc: run, kill, delete, exec, and what a container left behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tokio::process::{Child, Command};

use crate::RuncError;

/// The node's runc: its binary, and the state directory of the containers it runs.
#[derive(Clone, Debug)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
}

/// A container's runc, in the foreground: it exits when the container does. Dropping
/// it before [`Container::delete`] removes the container at once (`runc delete
/// --force`), so that nothing outlives its owner, a panic included.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    child: Child,
    log: PathBuf,
    runc: Runc,
    deleted: bool,
}

/// A process to start in a running container (`kubectl exec`).
#[derive(Clone, Debug, Default)]
pub struct ExecProcess {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
}

/// An exit status as a container reports it: the code, or 128 + the signal that ended it.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

impl Runc {
    /// The runc at `binary`, or the first `runc` on PATH; its containers' state goes
    /// under `state_root`.
    pub fn new(binary: Option<PathBuf>, state_root: PathBuf) -> Result<Self, RuncError> {
        let name = binary.clone().unwrap_or_else(|| PathBuf::from("runc"));
        let found = if name.components().count() > 1 {
            name.is_file().then(|| name.clone())
        } else {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(&name))
                    .find(|p| p.is_file())
            })
        };
        let binary = found.ok_or_else(|| RuncError::NotFound {
            binary: name.display().to_string(),
        })?;
        Ok(Self {
            binary,
            root: state_root,
        })
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root);
        c
    }

    /// Runs runc to its end, for the commands that only change state: `runc COMMAND
    /// FLAGS… ID ARGS…`.
    async fn call(
        &self,
        command: &'static str,
        flags: &[&str],
        id: &str,
        args: &[&str],
    ) -> Result<Vec<u8>, RuncError> {
        let out = self
            .command()
            .arg(command)
            .args(flags)
            .arg(id)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(RuncError::Spawn)?;
        if !out.status.success() {
            return Err(RuncError::Runc {
                command,
                id: id.into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    /// Starts the container of the bundle at `bundle` (its `config.json` written), with
    /// the given stdio passed through to it.
    pub fn run(
        &self,
        id: &str,
        bundle: &Path,
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<Container, RuncError> {
        let log = bundle.join("runc.log");
        let _ = std::fs::remove_file(&log);
        let child = self
            .command()
            .arg("--log")
            .arg(&log)
            .args([
                "--log-format",
                "json",
                "run",
                "--keep",
                "--no-new-keyring",
                "--bundle",
            ])
            .arg(bundle)
            .arg(id)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(RuncError::Spawn)?;
        Ok(Container {
            id: id.into(),
            child,
            log,
            runc: self.clone(),
            deleted: false,
        })
    }

    /// Sends `signal` (`TERM`, `KILL`) to every process of the container.
    pub async fn kill(&self, id: &str, signal: &str) -> Result<(), RuncError> {
        self.call("kill", &["--all"], id, &[signal]).await.map(drop)
    }

    /// Removes the container, killing what is left of it, with its cgroup.
    pub async fn delete(&self, id: &str) -> Result<(), RuncError> {
        self.call("delete", &["--force"], id, &[]).await.map(drop)
    }

    /// The container's state (`created`, `running`, `stopped`) and its init's PID, or
    /// None if runc does not know it.
    pub async fn state(&self, id: &str) -> Result<Option<(String, u32)>, RuncError> {
        match self.call("state", &[], id, &[]).await {
            Ok(out) => {
                let v: Value = serde_json::from_slice(&out).unwrap_or_default();
                Ok(Some((
                    v["status"].as_str().unwrap_or("").to_string(),
                    v["pid"].as_u64().unwrap_or(0) as u32,
                )))
            }
            Err(RuncError::Runc { message, .. }) if message.contains("does not exist") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The IDs of every container under this runc's state directory.
    pub async fn list(&self) -> Result<Vec<String>, RuncError> {
        let out = self
            .command()
            .args(["list", "--format", "json"])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(RuncError::Spawn)?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Starts a process in a running container; it ends with runc's exit.
    pub fn exec(
        &self,
        id: &str,
        process: &ExecProcess,
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<Child, RuncError> {
        if process.args.is_empty() {
            return Err(RuncError::Invalid("exec without a command".into()));
        }
        let mut c = self.exec_command(process);
        c.arg(id)
            .args(&process.args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(RuncError::Spawn)
    }

    /// `runc exec --tty` of `process` on a terminal of `columns` x `rows`, which this
    /// makes and returns the master of, with the process. runc in the foreground wants a
    /// terminal of its own to relay (it refuses to hand its console over unless it
    /// detaches, and then its exit code is lost): it gets this terminal's other side as
    /// its stdio, relays it to the one it makes in the container, and passes the size
    /// on. Reading the master gives the process's output; writing it, its input.
    pub fn exec_terminal(
        &self,
        id: &str,
        process: &ExecProcess,
        columns: u16,
        rows: u16,
    ) -> Result<(Child, std::fs::File), RuncError> {
        use rustix::pty::{grantpt, ioctl_tiocgptpeer, openpt, unlockpt, OpenptFlags};
        if process.args.is_empty() {
            return Err(RuncError::Invalid("exec without a command".into()));
        }
        let console = |e: rustix::io::Errno| RuncError::Console(e.into());
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .map_err(console)?;
        grantpt(&master).map_err(console)?;
        unlockpt(&master).map_err(console)?;
        let size = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: columns,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(&master, size).map_err(console)?;
        let side = ioctl_tiocgptpeer(
            &master,
            OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC,
        )
        .map_err(console)?;
        let dup = |fd: &std::os::fd::OwnedFd| fd.try_clone().map_err(RuncError::Console);
        let (stdin, stdout) = (dup(&side)?, dup(&side)?);
        let child = self
            .exec_command(process)
            .arg("--tty")
            .arg(id)
            .args(&process.args)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(side))
            .kill_on_drop(true)
            .spawn()
            .map_err(RuncError::Spawn)?;
        Ok((child, std::fs::File::from(master)))
    }

    fn exec_command(&self, process: &ExecProcess) -> Command {
        let mut c = self.command();
        c.args([
            "exec",
            "--user",
            &format!("{}:{}", process.uid, process.gid),
        ]);
        if !process.cwd.is_empty() {
            c.args(["--cwd", &process.cwd]);
        }
        for e in &process.env {
            c.args(["--env", e]);
        }
        c
    }

    /// Whether the kernel's OOM killer killed a process of the cgroup at `cgroups_path`
    /// (read before [`Runc::delete`] removes it): cgroup v2's `memory.events`, or v1's
    /// `memory.oom_control`.
    pub fn oom_killed(&self, cgroups_path: &str) -> bool {
        let rel = cgroups_path.trim_start_matches('/');
        let candidates = [
            Path::new("/sys/fs/cgroup").join(rel).join("memory.events"),
            Path::new("/sys/fs/cgroup/unified")
                .join(rel)
                .join("memory.events"),
            Path::new("/sys/fs/cgroup/memory")
                .join(rel)
                .join("memory.oom_control"),
        ];
        candidates.iter().any(|p| {
            std::fs::read_to_string(p).is_ok_and(|text| {
                text.lines().any(|l| {
                    l.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                        .is_some_and(|n| n > 0)
                })
            })
        })
    }
}

impl Container {
    /// Waits for the container to exit. Returns its exit code, and runc's own error if
    /// the container never ran (a bad spec, a command that is not in the image).
    pub async fn wait(&mut self) -> (i32, Option<String>) {
        let code = match self.child.wait().await {
            Ok(status) => exit_code(status),
            Err(_) => 255,
        };
        (code, runc_error(&self.log))
    }

    /// Removes the container once it has exited (or kills what is left of it).
    pub async fn delete(mut self) -> Result<(), RuncError> {
        self.deleted = true;
        self.runc.delete(&self.id).await
    }

    /// The reading end of the container's stdout, if it was piped (taken once).
    pub fn stdout(&mut self) -> Option<tokio::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The reading end of the container's stderr, if it was piped (taken once).
    pub fn stderr(&mut self) -> Option<tokio::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// runc's PID (the container's parent), while it runs.
    pub fn runc_pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// The last error runc logged, if it logged one.
fn runc_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["level"] == "error" || v["level"] == "fatal")
        .find_map(|v| v["msg"].as_str().map(String::from))
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // Synchronous: a drop cannot wait on a task, and this must happen even while the
        // runtime shuts down. runc kills the container's processes and removes its cgroup.
        let _ = std::process::Command::new(&self.runc.binary)
            .arg("--root")
            .arg(&self.runc.root)
            .args(["delete", "--force"])
            .arg(&self.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
