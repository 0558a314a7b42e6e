//! Spin's own variables and key-value interfaces, on Baton's backing: a component built
//! with Spin's SDK reads its variables from the container's wasi:config values and its
//! key-value stores from the pod's wasi:keyvalue buckets, unchanged.
//!
//! - `fermyon:spin/variables@2.0.0` (spin-sdk 2–5) and `spin:variables/variables@3.0.0`
//!   (spin-sdk 7, async): `get(name)`, granted with `config`. A name not set is
//!   `undefined`, as in Spin.
//! - `fermyon:spin/key-value@2.0.0` and `spin:key-value/key-value@3.0.0` (async, keys as a
//!   stream): a store is opened by its label, which names a bucket; granted with
//!   `keyvalue`. A label the pod did not declare is `access-denied`, as in Spin.

use std::sync::Arc;

use wasmtime::component::{
    Accessor, ComponentType, FutureReader, Lift, Linker, Lower, Resource, ResourceType,
    StreamReader,
};

use super::keyvalue::{Bucket, KvError, OpenBucket};
use crate::host::Host;

/// Keys `get-keys` returns at most: the interface has no paging.
const MAX_KEYS: usize = 100_000;

#[derive(ComponentType, Lift, Lower, Clone, Debug)]
#[component(variant)]
enum VariableError {
    #[component(name = "invalid-name")]
    #[allow(dead_code)]
    InvalidName(String),
    #[component(name = "undefined")]
    Undefined(String),
    #[component(name = "provider")]
    #[allow(dead_code)]
    Provider(String),
    #[component(name = "other")]
    #[allow(dead_code)]
    Other(String),
}

#[derive(ComponentType, Lift, Lower, Clone, Debug)]
#[component(variant)]
enum StoreError {
    #[component(name = "store-table-full")]
    #[allow(dead_code)]
    StoreTableFull,
    #[component(name = "no-such-store")]
    #[allow(dead_code)]
    NoSuchStore,
    #[component(name = "access-denied")]
    AccessDenied,
    #[component(name = "other")]
    Other(String),
}

impl From<KvError> for StoreError {
    fn from(e: KvError) -> Self {
        match e {
            KvError::AccessDenied => StoreError::AccessDenied,
            e => StoreError::Other(e.to_string()),
        }
    }
}

fn variable(host: &Host, name: &str) -> Result<String, VariableError> {
    host.platform
        .config()
        .snapshot()
        .get(name)
        .cloned()
        .ok_or_else(|| VariableError::Undefined(format!("no variable {name:?}")))
}

fn open(
    host: &mut Host,
    label: &str,
) -> wasmtime::Result<Result<Resource<OpenBucket>, StoreError>> {
    let Some(b) = host.platform.bucket(label) else {
        return Ok(Err(StoreError::AccessDenied));
    };
    Ok(Ok(host.table.push(OpenBucket(b))?))
}

fn bucket_of(host: &Host, handle: &Resource<OpenBucket>) -> wasmtime::Result<Arc<dyn Bucket>> {
    Ok(host.table.get(handle)?.0.clone())
}

/// Every key, page by page, up to [`MAX_KEYS`].
async fn all_keys(b: &Arc<dyn Bucket>) -> Result<Vec<String>, StoreError> {
    let mut keys = Vec::new();
    let mut cursor = None;
    loop {
        let (page, next) = b.list_keys(cursor).await?;
        keys.extend(page);
        if keys.len() > MAX_KEYS {
            return Err(StoreError::Other(format!(
                "the store has more than {MAX_KEYS} keys; list them with wasi:keyvalue"
            )));
        }
        match next {
            Some(n) => cursor = Some(n),
            None => return Ok(keys),
        }
    }
}

fn add_variables(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    let mut v2 = linker.instance("fermyon:spin/variables@2.0.0")?;
    v2.func_wrap("get", |store, (name,): (String,)| {
        Ok((variable(store.data(), &name),))
    })?;
    let mut v3 = linker.instance("spin:variables/variables@3.0.0")?;
    v3.func_wrap_concurrent("get", |acc: &Accessor<Host>, (name,): (String,)| {
        Box::pin(async move {
            let r = acc.with(|mut a| variable(a.data_mut(), &name));
            Ok::<_, wasmtime::Error>((r,))
        })
    })?;
    Ok(())
}

fn add_key_value_v2(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    let mut kv = linker.instance("fermyon:spin/key-value@2.0.0")?;
    kv.resource(
        "store",
        ResourceType::host::<OpenBucket>(),
        |mut store, rep| {
            store
                .data_mut()
                .table
                .delete(Resource::<OpenBucket>::new_own(rep))?;
            Ok(())
        },
    )?;
    kv.func_wrap("[static]store.open", |mut store, (label,): (String,)| {
        Ok((open(store.data_mut(), &label)?,))
    })?;
    kv.func_wrap_async(
        "[method]store.get",
        |store, (this, key): (Resource<OpenBucket>, String)| {
            Box::new(async move {
                let b = bucket_of(store.data(), &this)?;
                Ok((b.get(&key).await.map_err(StoreError::from),))
            })
        },
    )?;
    kv.func_wrap_async(
        "[method]store.set",
        |store, (this, key, value): (Resource<OpenBucket>, String, Vec<u8>)| {
            Box::new(async move {
                let b = bucket_of(store.data(), &this)?;
                Ok((b.set(&key, value).await.map_err(StoreError::from),))
            })
        },
    )?;
    kv.func_wrap_async(
        "[method]store.delete",
        |store, (this, key): (Resource<OpenBucket>, String)| {
            Box::new(async move {
                let b = bucket_of(store.data(), &this)?;
                Ok((b.delete(&key).await.map_err(StoreError::from),))
            })
        },
    )?;
    kv.func_wrap_async(
        "[method]store.exists",
        |store, (this, key): (Resource<OpenBucket>, String)| {
            Box::new(async move {
                let b = bucket_of(store.data(), &this)?;
                Ok((b.exists(&key).await.map_err(StoreError::from),))
            })
        },
    )?;
    kv.func_wrap_async(
        "[method]store.get-keys",
        |store, (this,): (Resource<OpenBucket>,)| {
            Box::new(async move {
                let b = bucket_of(store.data(), &this)?;
                Ok((all_keys(&b).await,))
            })
        },
    )?;
    Ok(())
}

fn add_key_value_v3(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    let mut kv = linker.instance("spin:key-value/key-value@3.0.0")?;
    kv.resource(
        "store",
        ResourceType::host::<OpenBucket>(),
        |mut store, rep| {
            store
                .data_mut()
                .table
                .delete(Resource::<OpenBucket>::new_own(rep))?;
            Ok(())
        },
    )?;
    kv.func_wrap_concurrent(
        "[static]store.open",
        |acc: &Accessor<Host>, (label,): (String,)| {
            Box::pin(async move {
                let r = acc.with(|mut a| open(a.data_mut(), &label))?;
                Ok::<_, wasmtime::Error>((r,))
            })
        },
    )?;
    kv.func_wrap_concurrent(
        "[method]store.get",
        |acc: &Accessor<Host>, (this, key): (Resource<OpenBucket>, String)| {
            Box::pin(async move {
                let b = acc.with(|mut a| bucket_of(a.data_mut(), &this))?;
                Ok::<_, wasmtime::Error>((b.get(&key).await.map_err(StoreError::from),))
            })
        },
    )?;
    kv.func_wrap_concurrent(
        "[method]store.set",
        |acc: &Accessor<Host>, (this, key, value): (Resource<OpenBucket>, String, Vec<u8>)| {
            Box::pin(async move {
                let b = acc.with(|mut a| bucket_of(a.data_mut(), &this))?;
                Ok::<_, wasmtime::Error>((b.set(&key, value).await.map_err(StoreError::from),))
            })
        },
    )?;
    kv.func_wrap_concurrent(
        "[method]store.delete",
        |acc: &Accessor<Host>, (this, key): (Resource<OpenBucket>, String)| {
            Box::pin(async move {
                let b = acc.with(|mut a| bucket_of(a.data_mut(), &this))?;
                Ok::<_, wasmtime::Error>((b.delete(&key).await.map_err(StoreError::from),))
            })
        },
    )?;
    kv.func_wrap_concurrent(
        "[method]store.exists",
        |acc: &Accessor<Host>, (this, key): (Resource<OpenBucket>, String)| {
            Box::pin(async move {
                let b = acc.with(|mut a| bucket_of(a.data_mut(), &this))?;
                Ok::<_, wasmtime::Error>((b.exists(&key).await.map_err(StoreError::from),))
            })
        },
    )?;
    kv.func_wrap_concurrent(
        "[method]store.get-keys",
        |acc: &Accessor<Host>, (this,): (Resource<OpenBucket>,)| {
            Box::pin(async move {
                let b = acc.with(|mut a| bucket_of(a.data_mut(), &this))?;
                // The keys are listed first, then streamed: a failure is the future's.
                let (keys, done) = match all_keys(&b).await {
                    Ok(keys) => (keys, Ok(())),
                    Err(e) => (Vec::new(), Err(e)),
                };
                let pair = acc.with(|mut a| -> wasmtime::Result<_> {
                    let keys = StreamReader::new(&mut a, keys)?;
                    let done =
                        FutureReader::new(&mut a, async move { Ok::<_, wasmtime::Error>(done) })?;
                    Ok((keys, done))
                })?;
                Ok::<_, wasmtime::Error>((pair,))
            })
        },
    )?;
    Ok(())
}

pub(super) fn add_to_linker(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    add_variables(linker)?;
    add_key_value_v2(linker)?;
    add_key_value_v3(linker)?;
    Ok(())
}
