//! Host stores through the C ABI: contexts of one process sharing one copy of each layer, named
//! stores shared by processes (this test binary, run again as a child, plays the processes), and
//! the bad cases: racing creators, a filler killed mid-fill, a stale store, a store of other
//! files or another version, a directory too small.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::ptr;
use strata::ffi::store::*;

/// Layers of the test model, and the width of each layer's square weight (f32) and its bias.
const LAYERS: usize = 8;
const WIDTH: usize = 256;

fn layer_bytes() -> u64 {
    ((WIDTH * WIDTH + WIDTH) * 4) as u64
}

fn model_bytes() -> u64 {
    layer_bytes() * LAYERS as u64
}

/// The model: blocks.{i}.weight [width, width] and blocks.{i}.bias [width], f32, distinct
/// values; `layers` of them.
fn model(layers: usize, width: usize) -> BTreeMap<String, Vec<u8>> {
    let mut tensors = BTreeMap::new();
    for i in 0..layers {
        tensors.insert(
            format!("blocks.{i}.weight"),
            f32_bytes(&weights(width * width, 2 * i as u64 + 1, 0.02)),
        );
        tensors.insert(
            format!("blocks.{i}.bias"),
            f32_bytes(&weights(width, 2 * i as u64 + 2, 0.02)),
        );
    }
    tensors
}

fn expected() -> BTreeMap<String, Vec<u8>> {
    model(LAYERS, WIDTH)
}

fn write_model_of(path: &Path, tensors: BTreeMap<String, Vec<u8>>) {
    let tensors: Vec<_> = tensors
        .into_iter()
        .map(|(name, bytes)| {
            let shape = match name.ends_with("weight") {
                true => {
                    let width = (bytes.len() as f64 / 4.0).sqrt() as usize;
                    vec![width, width]
                }
                false => vec![bytes.len() / 4],
            };
            (name, safetensors::Dtype::F32, shape, bytes)
        })
        .collect();
    write_safetensors(path, &tensors);
}

/// The test model written to a fresh directory, removed when the first value is dropped.
fn model_file(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let model = dir.path("model.safetensors");
    write_model_of(&model, expected());
    (dir, model)
}

struct Store(*mut strata_store);

impl Store {
    fn try_open(
        edit: impl FnOnce(&mut strata_store_options),
    ) -> std::result::Result<Store, strata_status> {
        let mut options = strata_store_options_default();
        edit(&mut options);
        let mut store = ptr::null_mut();
        match strata_store_create(&options, &mut store) {
            STRATA_OK => Ok(Store(store)),
            status => Err(status),
        }
    }

    fn open(edit: impl FnOnce(&mut strata_store_options)) -> Store {
        Self::try_open(edit).unwrap_or_else(|status| {
            panic!("strata_store_create: {}: {}", name(status), last_error())
        })
    }

    fn stats(&self) -> strata_store_stats {
        let mut stats = strata_store_stats {
            struct_size: std::mem::size_of::<strata_store_stats>() as u32,
            ..Default::default()
        };
        ok(strata_store_stats_get(self.0, &mut stats));
        stats
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        strata_store_destroy(self.0);
    }
}

// SAFETY: stores are thread-safe by contract.
unsafe impl Send for Store {}
// SAFETY: as above.
unsafe impl Sync for Store {}

/// A CPU context over `store` with the model registered in one group streamed from disk through
/// the onload tier in RAM; returns it with the group.
fn context_over(store: &Store, model: &Path) -> (Ctx, u64) {
    context_with(Some(store), model, LAYERS)
}

/// `context_over`, without a store when `store` is None.
fn context_with(store: Option<&Store>, model: &Path, layers: usize) -> (Ctx, u64) {
    let ctx = Ctx::new(0);
    if let Some(store) = store {
        ok(strata_context_attach_store(ctx.0, store.0));
    }
    let group = ctx.group(&tiers(|t| {
        t.offload = place(STRATA_DEVICE_DISK, STRATA_DTYPE_SOURCE);
        t.onload = place(STRATA_DEVICE_CPU, STRATA_DTYPE_SOURCE);
    }));
    assert_eq!(ctx.register_prefix(group, model, "blocks.", 2), layers);
    (ctx, group)
}

/// One pass over every layer, checking each tensor's bytes exactly; returns the address of each
/// layer's first view.
fn pass(ctx: &Ctx, expected: &BTreeMap<String, Vec<u8>>) -> Vec<usize> {
    (0..expected.len() / 2)
        .map(|i| {
            let layer = ctx.find(&format!("blocks.{i}"));
            let views = ctx.acquire(layer);
            assert_eq!(views.len(), 2);
            for (view, bytes) in &views {
                let name = view_name(view);
                assert!(expected[&name] == *bytes, "{name}: bytes differ");
            }
            let first = views[0].0.data as usize;
            ctx.release(layer);
            first
        })
        .collect()
}

#[test]
fn two_contexts_in_one_process_share_one_copy_read_once() {
    let (_dir, model) = model_file("store-two");
    let expected = expected();
    let store = Store::open(|_| {});
    let (a, group_a) = context_over(&store, &model);
    let (b, group_b) = context_over(&store, &model);
    // Both at once, so that some layers are wanted by both while one fills them.
    let (first_a, first_b) = std::thread::scope(|scope| {
        let run_a = scope.spawn(|| pass(&a, &expected));
        let run_b = scope.spawn(|| pass(&b, &expected));
        (run_a.join().unwrap(), run_b.join().unwrap())
    });
    assert_eq!(first_a, first_b, "the views of both point into one copy");
    assert_eq!(pass(&a, &expected), first_a);
    let (sa, sb, ss) = (a.stats(), b.stats(), store.stats());
    assert_eq!(
        sa.bytes_from_disk + sb.bytes_from_disk,
        model_bytes(),
        "the checkpoint is read once"
    );
    assert_eq!((ss.fills, ss.bytes_filled), (LAYERS as u64, model_bytes()));
    assert_eq!(
        ss.shared, LAYERS as u64,
        "each layer filled once, shared once"
    );
    assert_eq!((ss.host_in_use, ss.layers), (model_bytes(), LAYERS as u64));
    assert_eq!(ss.host_peak, model_bytes(), "host bytes are counted once");
    assert_eq!(
        (sa.host_in_use, sb.host_in_use),
        (0, 0),
        "the contexts hold no copy of their own"
    );
    // Freed with the last user: one context offloading keeps the copies, both free them.
    ok(strata_group_offload(a.0, group_a));
    assert_eq!(store.stats().host_in_use, model_bytes());
    ok(strata_group_offload(b.0, group_b));
    assert_eq!((store.stats().host_in_use, store.stats().layers), (0, 0));
    // And filled again, once, when needed again.
    pass(&b, &expected);
    let ss = store.stats();
    assert_eq!(
        (ss.fills, ss.host_in_use),
        (2 * LAYERS as u64, model_bytes())
    );
}

#[test]
fn a_store_limit_is_its_own_and_refuses_with_budget() {
    let (_dir, model) = model_file("store-limit");
    let store = Store::open(|o| o.host_limit = 3 * layer_bytes());
    let (ctx, group) = context_over(&store, &model);
    let status = strata_group_onload(ctx.0, group);
    expect(status, STRATA_ERR_BUDGET);
    assert!(last_error().contains("host store"), "{}", last_error());
    let stats = store.stats();
    assert_eq!(stats.host_in_use, 3 * layer_bytes());
    assert!(stats.host_peak <= 3 * layer_bytes());
}

#[test]
fn bad_store_arguments_get_a_status_and_a_message() {
    let mut store = ptr::null_mut();
    expect(
        strata_store_create(ptr::null(), &mut store),
        STRATA_ERR_NULL_ARGUMENT,
    );
    let options = strata_store_options_default();
    expect(
        strata_store_create(&options, ptr::null_mut()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    let mut short = strata_store_options_default();
    short.struct_size = 4;
    expect(
        strata_store_create(&short, &mut store),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    assert!(last_error().contains("struct_size"), "{}", last_error());
    let bad = |edit: &dyn Fn(&mut strata_store_options), needle: &str| {
        let status = Store::try_open(edit).err().expect("refused");
        assert_eq!(status, STRATA_ERR_INVALID_ARGUMENT, "{}", last_error());
        assert!(last_error().contains(needle), "{}", last_error());
    };
    let outside = cstr("../escape");
    bad(&|o| o.name = outside.as_ptr(), "store name");
    let empty = cstr("");
    bad(&|o| o.name = empty.as_ptr(), "store name");
    let fine = cstr("fine");
    bad(&|o| o.name = fine.as_ptr(), "needs the checkpoint");
    bad(&|o| o.mode = 0o4700, "mode");
    let missing = cstr("/nonexistent/model.safetensors");
    let status = Store::try_open(|o| {
        o.name = fine.as_ptr();
        o.checkpoint = missing.as_ptr();
    })
    .err()
    .expect("refused");
    assert_eq!(status, STRATA_ERR_NOT_FOUND, "{}", last_error());

    let store = Store::open(|_| {});
    let ctx = Ctx::new(0);
    ok(strata_context_attach_store(ctx.0, store.0));
    expect(
        strata_context_attach_store(ctx.0, store.0),
        STRATA_ERR_STATE,
    );
    expect(
        strata_context_attach_store(ctx.0, ptr::null_mut()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_context_attach_store(ctx.0, ctx.0 as *mut strata_store),
        STRATA_ERR_INVALID_HANDLE,
    );
    let mut stats = strata_store_stats::default();
    expect(
        strata_store_stats_get(store.0, &mut stats),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    let gone = Store::open(|_| {});
    let stale = gone.0;
    drop(gone);
    let ctx = Ctx::new(0);
    expect(
        strata_context_attach_store(ctx.0, stale),
        STRATA_ERR_INVALID_HANDLE,
    );
    strata_store_destroy(ptr::null_mut());
}

// ----- named stores, shared by processes -----

/// A name no other test or run uses.
fn unique(tag: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("test-{tag}-{}-{n}", std::process::id())
}

fn store_path(name: &str) -> PathBuf {
    PathBuf::from("/dev/shm").join(format!("strata-{name}"))
}

fn open_named(name: &str, model: &Path) -> std::result::Result<Store, strata_status> {
    let name = cstr(name);
    let checkpoint = cstr(model.to_str().unwrap());
    Store::try_open(|o| {
        o.name = name.as_ptr();
        o.checkpoint = checkpoint.as_ptr();
    })
}

/// What a child process is asked to do, through its environment.
struct Job<'a> {
    /// None: no store, each process its own copy.
    store: Option<&'a str>,
    model: &'a Path,
    layers: usize,
    width: usize,
    passes: usize,
    /// STRATA_FAULT_STORE_KILL_FILL for the child.
    kill_at_fill: Option<u32>,
    /// Whether the child checks every byte against a model it generates (which it then holds:
    /// figures of memory leave it out).
    check: bool,
}

/// One child: this test binary running `child_process` alone.
struct Process {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Process {
    fn spawn(job: &Job<'_>) -> Process {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "--exact",
                "child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("STRATA_TEST_STORE_CHILD", "1")
            .env("STORE_MODEL", job.model)
            .env("STORE_LAYERS", job.layers.to_string())
            .env("STORE_WIDTH", job.width.to_string())
            .env("STORE_PASSES", job.passes.to_string())
            .env("STORE_CHECK", u8::from(job.check).to_string())
            .env_remove("STRATA_FAULT_STORE_KILL_FILL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(name) = job.store {
            command.env("STORE_NAME", name);
        }
        if let Some(n) = job.kill_at_fill {
            command.env("STRATA_FAULT_STORE_KILL_FILL", n.to_string());
        }
        let mut child = command.spawn().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Process { child, lines }
    }

    /// The next line the child printed that starts with `prefix`; None once it has exited.
    fn line(&mut self, prefix: &str) -> Option<String> {
        for line in self.lines.by_ref() {
            let line = line.unwrap();
            if line.starts_with(prefix) {
                return Some(line);
            }
        }
        None
    }

    /// Its report once every pass is done: field -> value.
    fn done(&mut self) -> BTreeMap<String, u64> {
        let line = self
            .line("DONE")
            .unwrap_or_else(|| panic!("the child ended without finishing: {:?}", self.finish()));
        line.split_whitespace()
            .skip(1)
            .map(|field| {
                let (k, v) = field.split_once('=').unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect()
    }

    /// Lets the child exit, and returns how it did.
    fn finish(&mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        self.child.wait().unwrap()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Kilobytes of proportional set size: of the mappings of the file with inode `inode` when
/// given (the creator maps its store by the temporary name it made it under), else of the whole
/// process.
fn pss_kb(pid: u32, inode: Option<u64>) -> u64 {
    let Some(inode) = inode else {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
        return field_kb(&rollup, "Pss:");
    };
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut total = 0;
    let mut inside = false;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            inside = fields.get(4).and_then(|i| i.parse::<u64>().ok()) == Some(inode);
        } else if inside && line.starts_with("Pss:") {
            total += field_kb(line, "Pss:");
        }
    }
    total
}

fn field_kb(text: &str, field: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Acquires and releases every layer once, reading one byte of each page it is handed.
fn touch_every_layer(ctx: &Ctx, layers: usize) {
    for i in 0..layers {
        let layer = ctx.find(&format!("blocks.{i}"));
        let (status, views) = ctx.acquire_views(layer);
        ok(status);
        for view in &views {
            // SAFETY: a view points at `nbytes` readable bytes until the layer is released.
            let bytes =
                unsafe { std::slice::from_raw_parts(view.data as *const u8, view.nbytes as usize) };
            let sum: u64 = bytes.iter().step_by(4096).map(|&b| u64::from(b)).sum();
            std::hint::black_box(sum);
        }
        ctx.release(layer);
    }
}

/// The child's side: attach the store named in the environment (if any), run the passes over
/// the model checking every byte, report, then wait for the parent's word to exit.
#[test]
fn child_process() {
    if std::env::var_os("STRATA_TEST_STORE_CHILD").is_none() {
        return;
    }
    let env = |name: &str| std::env::var(name).unwrap();
    let model_path = PathBuf::from(env("STORE_MODEL"));
    let layers: usize = env("STORE_LAYERS").parse().unwrap();
    let width: usize = env("STORE_WIDTH").parse().unwrap();
    let passes: usize = env("STORE_PASSES").parse().unwrap();
    let expected = match env("STORE_CHECK").as_str() {
        "1" => model(layers, width),
        _ => BTreeMap::new(),
    };
    let store = std::env::var("STORE_NAME").ok().map(|name| {
        open_named(&name, &model_path).unwrap_or_else(|s| {
            panic!(
                "opening store {name}: {}: {}",
                common::name(s),
                last_error()
            )
        })
    });
    let (ctx, _group) = context_with(store.as_ref(), &model_path, layers);
    println!("READY");
    for i in 0..passes {
        match expected.is_empty() {
            false => drop(pass(&ctx, &expected)),
            true => touch_every_layer(&ctx, layers),
        }
        println!("PASS {i}");
    }
    let stats = ctx.stats();
    let store_stats = store.as_ref().map(|s| s.stats()).unwrap_or_default();
    println!(
        "DONE bytes_from_disk={} host_in_use={} created={} fills={} takeovers={} store_bytes={}",
        stats.bytes_from_disk,
        stats.host_in_use,
        store_stats.created,
        store_stats.fills,
        store_stats.takeovers,
        store_stats.host_in_use
    );
    std::io::stdout().flush().unwrap();
    // Held until the parent has measured every process.
    let _ = std::io::stdin().lines().next();
}

/// Runs `n` processes over one model, with or without a named store; returns for each its
/// report and its PSS (whole process, and of the store's file), measured while all are alive.
fn run_processes(
    n: usize,
    store: Option<&str>,
    model: &Path,
    layers: usize,
    width: usize,
) -> Vec<(BTreeMap<String, u64>, u64, u64)> {
    let job = Job {
        store,
        model,
        layers,
        width,
        passes: 2,
        kill_at_fill: None,
        check: true,
    };
    run_job(n, &job)
}

fn run_job(n: usize, job: &Job<'_>) -> Vec<(BTreeMap<String, u64>, u64, u64)> {
    let store = job.store;
    let mut processes: Vec<Process> = (0..n).map(|_| Process::spawn(job)).collect();
    let reports: Vec<_> = processes.iter_mut().map(|p| p.done()).collect();
    let inode = store.map(|name| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(store_path(name)).unwrap().ino()
    });
    let measured: Vec<_> = processes
        .iter()
        .zip(reports)
        .map(|(p, report)| {
            let whole = pss_kb(p.pid(), None);
            let of_store = inode.map_or(0, |inode| pss_kb(p.pid(), Some(inode)));
            (report, whole, of_store)
        })
        .collect();
    for p in &mut processes {
        assert!(p.finish().success());
    }
    measured
}

#[test]
fn processes_share_one_named_store_read_once() {
    let (_dir, model) = model_file("store-processes");
    for n in [2, 4] {
        let name = unique("share");
        let runs = run_processes(n, Some(&name), &model, LAYERS, WIDTH);
        let created: u64 = runs.iter().map(|r| r.0["created"]).sum();
        assert_eq!(created, 1, "of {n} racing to create it, one did");
        let read: u64 = runs.iter().map(|r| r.0["bytes_from_disk"]).sum();
        assert_eq!(
            read,
            model_bytes(),
            "{n} processes read the checkpoint once"
        );
        for (report, _, of_store) in &runs {
            assert_eq!(
                report["host_in_use"], 0,
                "no process holds a copy of its own"
            );
            assert!(*of_store > 0);
        }
        // Every process mapped every layer: their shares of the one copy add up to it.
        let store_kb: u64 = runs.iter().map(|r| r.2).sum();
        let model_kb = model_bytes() / 1024;
        assert!(
            store_kb >= model_kb * 9 / 10 && store_kb <= model_kb * 11 / 10,
            "{n} processes: PSS of the store {store_kb} KiB, the model {model_kb} KiB"
        );
        assert!(
            !store_path(&name).exists(),
            "the last process out removes the store"
        );
    }
}

#[test]
fn a_process_killed_mid_pass_leaves_the_others_working() {
    let (_dir, model) = model_file("store-kill");
    let name = unique("kill");
    let job = Job {
        store: Some(&name),
        model: &model,
        layers: LAYERS,
        width: WIDTH,
        passes: 200,
        kill_at_fill: None,
        check: true,
    };
    let mut processes: Vec<Process> = (0..3).map(|_| Process::spawn(&job)).collect();
    processes[0].line("PASS 1").expect("the first process runs");
    // SAFETY: kill only signals the child this test spawned.
    let signalled = unsafe { libc::kill(processes[0].pid() as i32, libc::SIGKILL) };
    assert_eq!(signalled, 0);
    let killed = processes[0].finish();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed),
        Some(libc::SIGKILL)
    );
    for p in &mut processes[1..] {
        let report = p.done();
        assert_eq!(report["host_in_use"], 0);
        assert!(p.finish().success(), "the others finish, every byte exact");
    }
    assert!(!store_path(&name).exists());
}

#[test]
fn a_filler_killed_mid_fill_never_hands_out_its_bytes() {
    let (_dir, model) = model_file("store-fill");
    let expected = expected();
    // Another process is attached: the store stays, and the dead filler's layer is filled again.
    let name = unique("fill");
    let store = open_named(&name, &model).unwrap();
    let job = Job {
        store: Some(&name),
        model: &model,
        layers: LAYERS,
        width: WIDTH,
        passes: 1,
        kill_at_fill: Some(3),
        check: true,
    };
    let mut filler = Process::spawn(&job);
    let status = filler.finish();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let (ctx, _) = context_over(&store, &model);
    pass(&ctx, &expected);
    let stats = store.stats();
    assert_eq!(
        stats.takeovers, 1,
        "the dead filler's layer was filled again"
    );
    assert_eq!(stats.layers, LAYERS as u64);
    drop(ctx);
    drop(store);
    assert!(!store_path(&name).exists());

    // The creator itself dies mid-fill with nobody else attached: the store is stale, and the
    // next process replaces it rather than trusting it.
    let name = unique("creator");
    let job = Job {
        store: Some(&name),
        ..job
    };
    let mut creator = Process::spawn(&job);
    assert!(!creator.finish().success());
    assert!(
        store_path(&name).exists(),
        "the dead creator left its store"
    );
    let store = open_named(&name, &model).unwrap();
    let (ctx, _) = context_over(&store, &model);
    pass(&ctx, &expected);
    let stats = store.stats();
    assert_eq!(
        (stats.created, stats.fills, stats.takeovers),
        (1, LAYERS as u64, 0)
    );
}

#[test]
fn a_stale_or_foreign_store_is_replaced_or_refused() {
    let (dir, model) = model_file("store-refuse");
    let other = dir.path("other.safetensors");
    write_model_of(&other, self::model(2, 64));

    // Junk left under the name with nobody holding it: replaced.
    let name = unique("junk");
    std::fs::write(store_path(&name), b"not a store").unwrap();
    let store = open_named(&name, &model).unwrap();
    assert_eq!(store.stats().created, 1);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(store_path(&name))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "created 0600");

    // While it is held: another checkpoint's files are refused, as is another version.
    let status = open_named(&name, &other).err().expect("refused");
    assert_eq!(status, STRATA_ERR_STATE, "{}", last_error());
    assert!(
        last_error().contains("another checkpoint"),
        "{}",
        last_error()
    );
    let attached = open_named(&name, &model).unwrap();
    assert_eq!(attached.stats().created, 0);
    let bytes = std::fs::read(store_path(&name)).unwrap();
    let version_at = 16;
    let mut patched = bytes[..version_at + 16].to_vec();
    patched[version_at..].copy_from_slice(b"0.0.0-other\0\0\0\0\0");
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(store_path(&name))
            .unwrap(),
        &patched[version_at..],
        version_at as u64,
    )
    .unwrap();
    let status = open_named(&name, &model).err().expect("refused");
    assert_eq!(status, STRATA_ERR_STATE, "{}", last_error());
    assert!(last_error().contains("0.0.0-other"), "{}", last_error());
    drop(attached);
    assert!(store_path(&name).exists(), "one process still holds it");
    drop(store);
    assert!(!store_path(&name).exists(), "the last out removed it");

    // Asked for a mode, it gets it, whatever the umask.
    let name = unique("mode");
    let (c_name, c_model) = (cstr(&name), cstr(model.to_str().unwrap()));
    let store = Store::open(|o| {
        o.name = c_name.as_ptr();
        o.checkpoint = c_model.as_ptr();
        o.mode = 0o660;
    });
    let mode = std::fs::metadata(store_path(&name))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
    drop(store);
}

#[test]
fn a_directory_too_small_for_the_store_is_out_of_memory_at_creation() {
    let (_dir, model) = model_file("store-small");
    // SAFETY: statvfs is plain data, zero a valid value.
    let mut fs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs fills the struct for a NUL-terminated path.
    let got = unsafe { libc::statvfs(cstr("/dev/shm").as_ptr(), &mut fs) };
    assert_eq!(got, 0);
    let size = fs.f_blocks * fs.f_frsize;
    let name = unique("small");
    let (c_name, c_model) = (cstr(&name), cstr(model.to_str().unwrap()));
    let status = Store::try_open(|o| {
        o.name = c_name.as_ptr();
        o.checkpoint = c_model.as_ptr();
        o.host_limit = size + (1 << 30);
    })
    .err()
    .expect("refused");
    assert_eq!(status, STRATA_ERR_OUT_OF_MEMORY, "{}", last_error());
    assert!(last_error().contains("/dev/shm"), "{}", last_error());
    assert!(!store_path(&name).exists());
    let leftovers = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(&name)
        })
        .count();
    assert_eq!(leftovers, 0, "no temporary file is left behind");
}

/// The README's figures: host memory (PSS summed over the processes, from /proc/PID/smaps_rollup)
/// and checkpoint bytes read, for 1, 2 and 4 processes over a 64 MiB model, each process its own
/// copy or all over one named store. Run with
/// `cargo test --release --test store -- --ignored --nocapture figures`.
#[test]
#[ignore]
fn figures_host_memory_of_processes_with_and_without_a_store() {
    let (layers, width) = (16, 1024);
    let dir = TempDir::new("store-figures");
    let model_path = dir.path("model.safetensors");
    write_model_of(&model_path, model(layers, width));
    let model_mib = ((width * width + width) * 4 * layers) as f64 / f64::from(1 << 20);
    println!("model: {layers} layers, {model_mib:.1} MiB");
    println!("| processes | store | PSS sum, MiB | of it the store, MiB | read from disk, MiB |");
    println!("|---|---|---|---|---|");
    for n in [1, 2, 4] {
        for with_store in [false, true] {
            let name = unique("figures");
            let job = Job {
                store: with_store.then_some(name.as_str()),
                model: &model_path,
                layers,
                width,
                passes: 2,
                kill_at_fill: None,
                check: false,
            };
            let runs = run_job(n, &job);
            let mib = |kb: u64| kb as f64 / 1024.0;
            let pss: u64 = runs.iter().map(|r| r.1).sum();
            let of_store: u64 = runs.iter().map(|r| r.2).sum();
            let read: u64 = runs.iter().map(|r| r.0["bytes_from_disk"]).sum();
            println!(
                "| {n} | {} | {:.1} | {:.1} | {:.1} |",
                if with_store { "named" } else { "none" },
                mib(pss),
                mib(of_store),
                read as f64 / f64::from(1 << 20)
            );
        }
    }
}
