//! The global compute pool: persistent workers with a low-latency wake-up.
//!
//! A job is `n_tasks` calls of one closure; workers and the calling thread claim task
//! indices from a shared counter, so a descheduled worker never stalls a call (the others
//! take its share). Idle workers spin briefly (decode issues a call every few µs), then park.
//!
//! Protocol. `state` is `2 * generation + open`. The caller, holding `busy_lock`, writes the job
//! fields while the state is even (closed), then publishes an odd state. A worker that sees a
//! new odd state announces itself in `inside` and re-reads `state`; only if it is unchanged
//! does it touch the job. The caller closes the job (even state) once every task is done and
//! then waits for `inside == 0`: with sequentially consistent ordering a late worker either is
//! counted or sees the closed state, so no worker can reach the closure after `parallel_for`
//! returns (the closure lives on the caller's stack).

use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(300);

/// A job's closure with its lifetime erased (see the module protocol for why that is sound).
type JobFn = &'static (dyn Fn(usize) + Sync);

struct Pool {
    /// `2 * generation + open`.
    state: AtomicUsize,
    /// The current job's closure; written only while the state is even and no worker is inside.
    job: UnsafeCell<Option<JobFn>>,
    n_tasks: AtomicUsize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// Workers currently between announcing themselves and leaving a job.
    inside: AtomicUsize,
    sleepers: AtomicUsize,
    panicked: AtomicBool,
    /// Workers allowed to take part (threads - 1).
    active: AtomicUsize,
    /// Held by the one thread running a job; others (or nested calls) run serially.
    busy_lock: AtomicBool,
    threads: Mutex<Vec<Thread>>,
}

// SAFETY: `job` is the only non-Sync field; it is written only by the `busy_lock` holder while
// the job is closed and no worker is inside, and read by workers only inside an open job
// (see the module protocol), so accesses never race.
unsafe impl Sync for Pool {}

thread_local! {
    /// Set on pool workers so that a nested `parallel_for` runs inline.
    static IS_WORKER: Cell<bool> = const { Cell::new(false) };
    /// Set on background threads (training), whose `parallel_for` runs inline so they never
    /// hold the pool the serving forward needs.
    static IS_BACKGROUND: Cell<bool> = const { Cell::new(false) };
    /// Set while the thread runs [`serial`] work.
    static IS_SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread was marked by [`background_thread`].
pub fn is_background_thread() -> bool {
    IS_BACKGROUND.with(Cell::get)
}

/// Whether a `parallel_for` made on the calling thread runs its tasks on this thread alone
/// (a pool worker, a background thread, or [`serial`] work): splitting work for the pool
/// gains nothing there.
pub fn runs_inline() -> bool {
    IS_WORKER.with(Cell::get) || IS_BACKGROUND.with(Cell::get) || IS_SERIAL.with(Cell::get)
}

/// Runs `f` with every `parallel_for` it makes on the calling thread alone: for work spread
/// over threads of its own (one item per thread), where the pool would only contend for the
/// same cores. Tasks are still split as [`num_threads`] says, so results do not change.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            IS_SERIAL.with(|s| s.set(self.0));
        }
    }
    struct Running;
    impl Drop for Running {
        fn drop(&mut self) {
            SERIAL_RUNNING.fetch_sub(1, SeqCst);
        }
    }
    let _reset = Reset(IS_SERIAL.with(|s| s.replace(true)));
    SERIAL_RUNNING.fetch_add(1, SeqCst);
    let _running = Running;
    f()
}

/// Threads inside [`serial`] work now: they keep the cores busy themselves, so an idle pool
/// worker parks at once instead of spinning for the next job beside them.
static SERIAL_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Marks the calling thread as background work: its `parallel_for` calls run on it alone
/// (never taking the compute pool from the serving forward), and on Linux its scheduling
/// priority drops (nice 10), so serving threads win the cores while it runs and training
/// still advances, at about a tenth of the CPU, under a serving load that never pauses.
pub fn background_thread() {
    IS_BACKGROUND.with(|b| b.set(true));
    lower_thread_priority();
}

/// Lowers the calling thread's scheduling priority to nice 10 (Linux: per thread; elsewhere a
/// no-op). Best effort: a failure leaves the priority unchanged.
pub fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread's own id, no memory passed.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    let mut created = false;
    let p = POOL.get_or_init(|| {
        created = true;
        Pool {
            state: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            n_tasks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            inside: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            busy_lock: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        }
    });
    if created {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        resize(p, n);
    }
    p
}

/// Spawns workers up to `n - 1` and sets how many take part.
fn resize(p: &'static Pool, n: usize) {
    let want = n.max(1) - 1;
    let mut threads = p.threads.lock().unwrap_or_else(|e| e.into_inner());
    while threads.len() < want {
        let index = threads.len();
        let spawned = std::thread::Builder::new()
            .name(format!("quant-pool-{index}"))
            .spawn(move || worker(p, index));
        match spawned {
            Ok(h) => threads.push(h.thread().clone()),
            Err(_) => break, // run with fewer threads rather than fail
        }
    }
    p.active.store(want.min(threads.len()), SeqCst);
    // Wake parked workers so newly inactive ones re-check and active ones stay responsive.
    threads.iter().for_each(Thread::unpark);
}

/// Sets the number of compute threads (including the caller); `0` is treated as 1.
pub fn set_num_threads(n: usize) {
    resize(pool(), n);
}

/// The number of compute threads (including the caller).
pub fn num_threads() -> usize {
    pool().active.load(Relaxed) + 1
}

/// Claims and runs tasks of the open job until none remain.
fn run_tasks(p: &Pool, f: &(dyn Fn(usize) + Sync), n: usize) {
    loop {
        let t = p.next.fetch_add(1, Relaxed);
        if t >= n {
            break;
        }
        if catch_unwind(AssertUnwindSafe(|| f(t))).is_err() {
            p.panicked.store(true, Relaxed);
        }
        p.done.fetch_add(1, Release);
    }
}

fn worker(p: &'static Pool, index: usize) {
    IS_WORKER.with(|w| w.set(true));
    let mut seen = p.state.load(SeqCst);
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let s = p.state.load(Acquire);
            if s != seen {
                seen = s;
                if s & 1 == 1 && index < p.active.load(Relaxed) {
                    break;
                }
                idle_since = Instant::now();
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            let inactive = index >= p.active.load(Relaxed) || SERIAL_RUNNING.load(Relaxed) > 0;
            if inactive || (spins.is_multiple_of(64) && idle_since.elapsed() > SPIN) {
                p.sleepers.fetch_add(1, SeqCst);
                if p.state.load(SeqCst) == seen {
                    std::thread::park();
                }
                p.sleepers.fetch_sub(1, SeqCst);
                idle_since = Instant::now();
            }
        }
        p.inside.fetch_add(1, SeqCst);
        if p.state.load(SeqCst) == seen {
            // SAFETY: the job is open and unchanged since we announced ourselves, so `job`
            // was published before the state (Release/Acquire) and cannot be rewritten or
            // go out of scope until we leave (`inside` is waited on before closing completes).
            let job = unsafe { *p.job.get() };
            if let Some(f) = job {
                run_tasks(p, f, p.n_tasks.load(Relaxed));
            }
        }
        p.inside.fetch_sub(1, SeqCst);
    }
}

/// Run `f(task_index)` for `task_index in 0..n_tasks` on the pool (the calling thread
/// participates). Nested or concurrent calls run serially on the calling thread.
pub fn parallel_for(n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    if n_tasks == 0 {
        return;
    }
    let p = pool();
    let nested =
        IS_WORKER.with(Cell::get) || IS_BACKGROUND.with(Cell::get) || IS_SERIAL.with(Cell::get);
    if n_tasks == 1
        || nested
        || p.active.load(Relaxed) == 0
        || p.busy_lock
            .compare_exchange(false, true, Acquire, Relaxed)
            .is_err()
    {
        (0..n_tasks).for_each(f);
        return;
    }
    // SAFETY: we hold `busy_lock` and the state is even (closed) with no worker inside, so no
    // one reads `job`. The lifetime is erased, but this function does not return before the
    // job is closed and `inside == 0`, so no worker can use `f` after it goes out of scope.
    unsafe {
        *p.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), JobFn>(f));
    }
    p.n_tasks.store(n_tasks, Relaxed);
    p.next.store(0, Relaxed);
    p.done.store(0, Relaxed);
    p.panicked.store(false, Relaxed);
    let open = p.state.load(Relaxed) + 1;
    p.state.store(open, SeqCst);
    if p.sleepers.load(SeqCst) > 0 {
        let threads = p.threads.lock().unwrap_or_else(|e| e.into_inner());
        let active = p.active.load(Relaxed);
        threads.iter().take(active).for_each(Thread::unpark);
    }
    run_tasks(p, f, n_tasks);
    while p.done.load(Acquire) < n_tasks {
        std::hint::spin_loop();
    }
    p.state.store(open + 1, SeqCst);
    while p.inside.load(SeqCst) > 0 {
        std::hint::spin_loop();
    }
    // SAFETY: closed and nobody inside (see above); drop the erased reference.
    unsafe {
        *p.job.get() = None;
    }
    let panicked = p.panicked.load(Relaxed);
    p.busy_lock.store(false, Release);
    if panicked {
        resume_unwind(Box::new("a parallel_for task panicked"));
    }
}
