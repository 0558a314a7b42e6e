//! `baton:pod/processes`: the host interface behind the debug toolbox's `ps`.
//!
//! A Wasm pod has no process table a guest could read, so Baton offers one: the pod's live
//! guest tasks (see `usage::Task`), with what each has used. The interface is defined in
//! `wit/pod.wit`; a component that does not import it pays nothing. A guest sees only its
//! own pod, as a process sees only its own PID namespace.

use wasmtime::component::{HasSelf, Linker};

use crate::host::Host;

wasmtime::component::bindgen!({
    path: "wit",
    world: "baton:pod/host",
});

use baton::pod::processes::{self, Process};

impl processes::Host for Host {
    fn list_processes(&mut self) -> Vec<Process> {
        self.net
            .pod
            .usage
            .tasks()
            .into_iter()
            .map(|t| Process {
                pid: t.pid,
                container: t.container,
                kind: t.kind.name().to_string(),
                command: t.command,
                age_ms: t.age.as_millis() as u64,
                cpu_ns: t.cpu_nanos,
                memory_bytes: t.memory_bytes as u64,
            })
            .collect()
    }
}

pub(crate) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    processes::add_to_linker::<Host, HasSelf<Host>>(linker, |h| h)
}
