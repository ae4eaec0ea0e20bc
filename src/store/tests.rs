use super::*;
use crate::error::{Error, ErrorKind};
use std::sync::atomic::AtomicUsize;
use std::sync::Barrier;

fn key(n: u8) -> LayerKey {
    LayerKey::from_parts(vec![n; 24], Vec::new())
}

fn local(limit: u64) -> Arc<Store> {
    Store::open(&StoreOptions {
        host_limit: limit,
        ..StoreOptions::default()
    })
    .unwrap()
}

#[test]
fn threads_wanting_one_layer_fill_it_once_and_share_it() {
    let store = local(u64::MAX);
    let fills = AtomicUsize::new(0);
    let barrier = Barrier::new(4);
    let leases: Vec<Lease> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    store
                        .layer(&key(1), 1 << 20, |buffer| {
                            fills.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            buffer.fill(7);
                            Ok(())
                        })
                        .unwrap()
                        .unwrap()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    assert_eq!(fills.load(Ordering::Relaxed), 1);
    let first = leases[0].as_slice().as_ptr();
    for lease in &leases {
        assert_eq!(lease.as_slice().as_ptr(), first, "one copy");
        assert!(lease.as_slice().iter().all(|&b| b == 7));
    }
    let stats = store.stats();
    assert_eq!(
        (stats.fills, stats.shared, stats.host_in_use),
        (1, 3, 1 << 20)
    );
    assert_eq!(stats.waits, 3, "the other three waited for the one fill");
    drop(leases);
    assert_eq!((store.stats().host_in_use, store.stats().layers), (0, 0));
}

#[test]
fn a_failed_or_panicking_fill_leaves_the_layer_to_the_next_user() {
    let store = local(u64::MAX);
    let failed = store.layer(&key(2), 4096, |_| Err(Error::io("disk gone")));
    assert_eq!(failed.err().unwrap().kind, ErrorKind::Io);
    assert_eq!(
        store.stats().host_in_use,
        0,
        "the failed copy is given back"
    );
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.layer(&key(2), 4096, |_| panic!("a bug mid-fill"))
    }));
    assert!(panicked.is_err());
    assert_eq!(store.stats().host_in_use, 0);
    let lease = store
        .layer(&key(2), 4096, |buffer| {
            buffer.fill(3);
            Ok(())
        })
        .unwrap()
        .unwrap();
    assert!(lease.as_slice().iter().all(|&b| b == 3));
    assert_eq!(store.stats().fills, 1);
}

#[test]
fn layers_over_the_store_limit_are_refused_with_budget() {
    let store = local(10_000);
    let fill = |buffer: &mut [u8]| {
        buffer.fill(1);
        Ok(())
    };
    let held = store.layer(&key(3), 6000, fill).unwrap().unwrap();
    let refused = store.layer(&key(4), 6000, fill).err().unwrap();
    assert_eq!(refused.kind, ErrorKind::Budget);
    assert!(
        refused.message.contains("host store"),
        "{}",
        refused.message
    );
    drop(held);
    store.layer(&key(4), 6000, fill).unwrap().unwrap();
}
