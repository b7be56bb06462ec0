//! Memory a burst leaves behind in jemalloc's thread caches, given back once
//! a runtime thread goes idle.
//!
//! jemalloc keeps each thread's recently freed small objects in a cache of
//! its own, and trims it only as that thread allocates again. A sidecar
//! worker that served 10,000 connections and then went quiet kept about
//! 2 MiB of them for good: RSS 30 s after the connections closed stayed
//! 28 to 31 % above idle (docs/BENCHMARKS.md). Turning the caches off gives
//! that memory back but costs 8 to 15 % CPU per request; flushing them when
//! a thread parks, at most once per [`PERIOD`], costs one atomic load per
//! park and gives it back (+18 % after the same burst; see [`thread_idle`]
//! for how the freed pages reach the OS).
//!
//! Written by hand: `thread.idle` is jemalloc's documented hint for this,
//! and no wrapper crate names it (tikv-jemalloc-ctl has no such call).

use std::cell::Cell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often a thread's cache may be flushed: rare enough to cost nothing
/// under load, soon enough that memory comes back well within the 30 s an
/// operator watching a pod's RSS would wait.
pub const PERIOD: Duration = Duration::from_secs(5);

/// Bumped every [`PERIOD`] by [`tick`]; a thread that parks and has not
/// seen the current value flushes its cache.
static EPOCH: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The epoch this thread last flushed in.
    static SEEN: Cell<u64> = const { Cell::new(0) };
}

/// Has `builder`'s threads flush their caches when they park after an
/// epoch [`tick`] started; run [`tick`] on the runtime for the epochs.
/// With one worker (`--workers 1`, a current-thread runtime) that thread
/// flushes at least every [`PERIOD`]; with more, a worker that stays parked
/// after a burst keeps its cache until it next has work.
pub fn release_when_idle(builder: &mut tokio::runtime::Builder) -> &mut tokio::runtime::Builder {
    builder.on_thread_park(on_park)
}

/// Starts a new epoch every [`PERIOD`]. It also wakes an idle runtime, so
/// that its thread parks again and flushes what the last burst left.
pub async fn tick() {
    let mut every = tokio::time::interval(PERIOD);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        EPOCH.fetch_add(1, Ordering::Relaxed);
    }
}

fn on_park() {
    let epoch = EPOCH.load(Ordering::Relaxed);
    if SEEN.get() == epoch {
        return;
    }
    SEEN.set(epoch);
    if let Err(code) = thread_idle() {
        // Only a jemalloc without thread.idle (older than 5.3) refuses:
        // nothing to give back, and nothing the operator can do.
        tracing::debug!(code, "jemalloc thread.idle refused");
    }
}

/// Tells jemalloc this thread goes idle (`thread.idle`, jemalloc 5.3): it
/// flushes the thread's cache to the arenas and, with jemalloc's default
/// arena count (more than twice the CPUs), purges the dirty pages of the
/// thread's arena at once instead of after their decay time. `Err` holds
/// mallctl's error.
///
/// The crate's one `unsafe` block outside tests: mallctl is a C function
/// (see the module doc for why no safe wrapper serves).
#[allow(unsafe_code)]
pub fn thread_idle() -> Result<(), i32> {
    const NAME: &CStr = c"thread.idle";
    // SAFETY: `thread.idle` reads and writes nothing: every pointer is null
    // and the length 0, as mallctl requires for such a name
    // (NEITHER_READ_NOR_WRITE); NAME is a NUL-terminated static string.
    let code = unsafe {
        tikv_jemalloc_sys::mallctl(
            NAME.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    match code {
        0 => Ok(()),
        code => Err(code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_takes_the_idle_hint() {
        assert_eq!(thread_idle(), Ok(()));
    }

    /// Reads a `size_t` or `unsigned` setting of jemalloc's.
    #[allow(unsafe_code)]
    fn setting<T: Copy + Default>(name: &str) -> T {
        let name = std::ffi::CString::new(name).expect("no NUL in a mallctl name");
        let mut value = T::default();
        let mut len = std::mem::size_of::<T>();
        // SAFETY: `value` is a `T` and `len` its size, as mallctl requires
        // for a read (it fails with EINVAL on a size that differs); nothing
        // is written to jemalloc (null new value, length 0).
        let code = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::from_mut(&mut value).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(code, 0, "mallctl {name:?}");
        value
    }

    /// The build-time settings (.cargo/config.toml) are the ones jemalloc
    /// runs with: a build without them would keep a burst's large buffers
    /// in thread caches, refill small caches from the arena several times
    /// per request and make a slab per 4 KiB buffer.
    #[test]
    fn jemalloc_runs_with_the_build_settings() {
        assert_eq!(setting::<usize>("arenas.tcache_max"), 4096);
        assert_eq!(setting::<u32>("opt.tcache_nslots_small_min"), 64);
        let bins = setting::<u32>("arenas.nbins");
        let slab = (0..bins)
            .find(|i| setting::<usize>(&format!("arenas.bin.{i}.size")) == 4096)
            .map(|i| setting::<usize>(&format!("arenas.bin.{i}.slab_size")));
        assert_eq!(slab, Some(64 * 1024), "the 4 KiB class's slab");
    }

    #[test]
    fn a_parking_thread_flushes_once_per_epoch() {
        EPOCH.fetch_add(1, Ordering::Relaxed);
        on_park();
        let seen = SEEN.get();
        assert_eq!(
            seen,
            EPOCH.load(Ordering::Relaxed),
            "flushed and noted the epoch"
        );
        on_park();
        assert_eq!(SEEN.get(), seen, "nothing more within the epoch");
    }
}
