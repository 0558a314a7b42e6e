//! A container's OCI runtime spec, from what the node decided about it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxCapabilities, LinuxCpu, LinuxMemory, LinuxNamespace, LinuxNamespaceType,
    LinuxPids, Mount, Process, Root, Spec, User,
};

use crate::RuncError;

/// One volume, bind-mounted into the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: PathBuf,
    pub readonly: bool,
}

/// `securityContext.seccompProfile`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompProfile {
    /// The runtime's default: see [`crate::seccomp`].
    #[default]
    RuntimeDefault,
    Unconfined,
}

/// What one container runs with; [`ContainerConfig::spec`] makes its runtime spec.
#[derive(Clone, Debug, Default)]
pub struct ContainerConfig {
    /// runc's name for it: unique on the node.
    pub id: String,
    pub hostname: String,
    /// Its root filesystem (its own writable view of the image).
    pub rootfs: PathBuf,
    pub readonly_rootfs: bool,
    /// The process: argv, `KEY=VALUE` environment, working directory.
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub mounts: Vec<BindMount>,
    /// The pod's network namespace (`/run/netns/…`), shared by its containers.
    pub network_namespace: Option<PathBuf>,
    /// A PID namespace to join (`shareProcessNamespace`); None gives it its own.
    pub pid_namespace: Option<PathBuf>,
    pub memory_limit: Option<u64>,
    /// `resources.limits.cpu` in millicores: a CFS quota.
    pub cpu_limit_millis: Option<u64>,
    /// `resources.requests.cpu` in millicores: its CPU weight.
    pub cpu_request_millis: u64,
    pub pids_limit: Option<i64>,
    /// `securityContext.capabilities`, as Kubernetes names them (`NET_ADMIN`, `ALL`).
    pub capabilities_add: Vec<String>,
    pub capabilities_drop: Vec<String>,
    /// `allowPrivilegeEscalation: false` (or a non-root user with no say): the process
    /// gains no privileges through setuid binaries or file capabilities.
    pub no_new_privileges: bool,
    pub seccomp: SeccompProfile,
    /// The cgroup it runs in, relative to each hierarchy's root.
    pub cgroups_path: String,
}

/// The capabilities a container has unless it drops them: Docker's and containerd's set.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// The CFS period quotas are counted in, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

/// A capability as Kubernetes names it (`NET_ADMIN`) or as the kernel does (`CAP_…`).
fn capability(name: &str) -> Result<Capability, RuncError> {
    serde_json::from_value(serde_json::Value::String(name.into()))
        .map_err(|_| RuncError::Invalid(format!("unknown capability {name:?}")))
}

/// Every capability the kernel defines, for `add: [ALL]`.
const ALL_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

impl ContainerConfig {
    /// The container's capability set: the default, plus what it adds, minus what it
    /// drops (`ALL` on either side meaning every one), as containerd computes it.
    pub fn capabilities(&self) -> Result<HashSet<Capability>, RuncError> {
        let is_all = |v: &[String]| v.iter().any(|c| c.eq_ignore_ascii_case("ALL"));
        let mut caps: HashSet<Capability> = if is_all(&self.capabilities_add) {
            ALL_CAPABILITIES
                .iter()
                .map(|c| capability(c))
                .collect::<Result<_, _>>()?
        } else {
            let mut s = DEFAULT_CAPABILITIES
                .iter()
                .map(|c| capability(c))
                .collect::<Result<HashSet<_>, _>>()?;
            for c in &self.capabilities_add {
                s.insert(capability(c)?);
            }
            s
        };
        if is_all(&self.capabilities_drop) {
            // Dropping all keeps only what is added by name.
            caps = self
                .capabilities_add
                .iter()
                .filter(|c| !c.eq_ignore_ascii_case("ALL"))
                .map(|c| capability(c))
                .collect::<Result<_, _>>()?;
        } else {
            for c in &self.capabilities_drop {
                caps.remove(&capability(c)?);
            }
        }
        Ok(caps)
    }

    /// The runtime spec runc reads from the bundle's `config.json`.
    pub fn spec(&self) -> Result<Spec, RuncError> {
        if self.args.is_empty() {
            return Err(RuncError::Invalid(
                "the container has no command: neither the pod nor the image gives one".into(),
            ));
        }
        let caps = self.capabilities()?;
        let mut process = Process::default();
        process.set_args(Some(self.args.clone()));
        process.set_env(Some(self.env.clone()));
        process.set_cwd(PathBuf::from(if self.cwd.is_empty() {
            "/"
        } else {
            &self.cwd
        }));
        let mut user = User::default();
        user.set_uid(self.uid);
        user.set_gid(self.gid);
        if !self.additional_gids.is_empty() {
            user.set_additional_gids(Some(self.additional_gids.clone()));
        }
        process.set_user(user);
        // A non-root process starts with no effective capabilities, as under containerd:
        // they stay in its bounding set for a setuid or file-capability binary.
        let effective = if self.uid == 0 {
            caps.clone()
        } else {
            HashSet::new()
        };
        let mut set = LinuxCapabilities::default();
        set.set_bounding(Some(caps.clone()));
        set.set_permitted(Some(effective.clone()));
        set.set_effective(Some(effective));
        set.set_inheritable(Some(HashSet::new()));
        set.set_ambient(Some(HashSet::new()));
        process.set_capabilities(Some(set));
        process.set_no_new_privileges(Some(self.no_new_privileges));
        process.set_terminal(Some(false));

        let mut spec = Spec::default();
        spec.set_hostname(Some(self.hostname.clone()));
        spec.set_process(Some(process));
        let mut root = Root::default();
        root.set_path(self.rootfs.clone());
        root.set_readonly(Some(self.readonly_rootfs));
        spec.set_root(Some(root));

        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for m in &self.mounts {
            if !m.destination.is_absolute() {
                return Err(RuncError::Invalid(format!(
                    "mount destination {} is not absolute",
                    m.destination.display()
                )));
            }
            let mut mount = Mount::default();
            mount.set_destination(m.destination.clone());
            mount.set_typ(Some("bind".into()));
            mount.set_source(Some(m.source.clone()));
            let mut options = vec!["rbind", "rprivate", "nosuid", "nodev"];
            options.push(if m.readonly { "ro" } else { "rw" });
            mount.set_options(Some(options.into_iter().map(String::from).collect()));
            mounts.push(mount);
        }
        spec.set_mounts(Some(mounts));

        let mut linux = spec.linux().clone().unwrap_or_default();
        let mut namespaces: Vec<LinuxNamespace> = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| {
                n.typ() != LinuxNamespaceType::Network && n.typ() != LinuxNamespaceType::Pid
            })
            .collect();
        let mut ns = |typ, path: Option<&Path>| {
            let mut n = LinuxNamespace::default();
            n.set_typ(typ);
            n.set_path(path.map(Path::to_path_buf));
            namespaces.push(n);
        };
        ns(
            LinuxNamespaceType::Network,
            self.network_namespace.as_deref(),
        );
        ns(LinuxNamespaceType::Pid, self.pid_namespace.as_deref());
        linux.set_namespaces(Some(namespaces));

        let mut resources = linux.resources().clone().unwrap_or_default();
        if let Some(limit) = self.memory_limit {
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut memory = LinuxMemory::default();
            memory.set_limit(Some(limit));
            // No swap beyond the limit: the limit is what the container may hold.
            memory.set_swap(Some(limit));
            resources.set_memory(Some(memory));
        }
        let mut cpu = LinuxCpu::default();
        // cgroup v1 shares, as the kubelet converts a request: 1024 per core, at least 2.
        cpu.set_shares(Some((self.cpu_request_millis * 1024 / 1000).max(2)));
        if let Some(millis) = self.cpu_limit_millis {
            cpu.set_quota(Some((millis * CPU_PERIOD_US / 1000).max(1000) as i64));
            cpu.set_period(Some(CPU_PERIOD_US));
        }
        resources.set_cpu(Some(cpu));
        if let Some(limit) = self.pids_limit {
            let mut pids = LinuxPids::default();
            pids.set_limit(limit);
            resources.set_pids(Some(pids));
        }
        linux.set_resources(Some(resources));
        linux.set_cgroups_path(Some(PathBuf::from(&self.cgroups_path)));
        if self.seccomp == SeccompProfile::RuntimeDefault {
            linux.set_seccomp(Some(crate::seccomp::runtime_default(&caps)));
        }
        spec.set_linux(Some(linux));
        Ok(spec)
    }

    /// Writes the bundle's `config.json` into `bundle` (which holds, or points to, the
    /// root filesystem).
    pub fn write_bundle(&self, bundle: &Path) -> Result<PathBuf, RuncError> {
        let spec = self.spec()?;
        std::fs::create_dir_all(bundle).map_err(|source| RuncError::Bundle {
            path: bundle.to_path_buf(),
            source,
        })?;
        let path = bundle.join("config.json");
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| RuncError::Bundle {
            path: path.clone(),
            source: e.into(),
        })?;
        std::fs::write(&path, json).map_err(|source| RuncError::Bundle {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}
