//! The conntrack tables from user space: batched access, safe deletion and garbage collection.
//!
//! The datapath's clock, batched reads and writes (BPF_MAP_LOOKUP_BATCH /
//! BPF_MAP_UPDATE_BATCH, a few syscalls for a whole table instead of one per
//! entry), deletions that leave alone an entry the datapath gave a new flow
//! meanwhile, garbage collection of expired entries off the agent's runtime,
//! and the figures by state that `/metrics` shows.
use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use aya::maps::{MapData, MapInfo};
use lb_common::{
    CONNTRACK_MAPS, CONNTRACK_MAPS_V6, ConntrackKey, ConntrackValue, DatapathClock, IPPROTO_TCP, IpAddress, Ipv6,
    lifecycle::{STATE_NAMES, is_alive, state_name, ticks_from_ns},
};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};

/// The monotonic clock in the datapath's ticks (`lb_common::lifecycle`),
/// coarsely (CLOCK_MONOTONIC_COARSE, updated at each timer tick): the
/// datapath's clock, jiffies turned into monotonic time, stands within a
/// timer tick of it.
pub fn now_ticks() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ticks_from_ns(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The datapath's clock conversion (jiffies → monotonic ticks) for this
/// kernel, found once per process (it takes 100 ms): `None` when the
/// kernel's timer list cannot be read (the datapath then reads the
/// monotonic clock with a helper call).
pub fn datapath_clock() -> Option<DatapathClock> {
    static CLOCK: std::sync::OnceLock<Option<DatapathClock>> = std::sync::OnceLock::new();
    *CLOCK.get_or_init(|| {
        let read = || std::fs::read_to_string("/proc/timer_list");
        let first = read();
        std::thread::sleep(Duration::from_millis(100));
        match (first, read()) {
            (Ok(first), Ok(second)) => clock_from_timer_lists(&first, &second),
            (Err(e), _) | (_, Err(e)) => {
                warn!("reading /proc/timer_list for the kernel's HZ: {e}; the datapath reads the monotonic clock with a helper call instead");
                None
            }
        }
    })
}

/// The kernel's tick counter and its rate from two reads of
/// /proc/timer_list some time apart, each with "now at N nsecs"
/// (CLOCK_MONOTONIC) and the first "jiffies: J": HZ is the kernel's choice
/// (100, 250, 300 or 1000) nearest to the jiffies counted per second, and
/// the base is where jiffies stood when the monotonic clock read 0.
pub fn clock_from_timer_lists(first: &str, second: &str) -> Option<DatapathClock> {
    let reading = |text: &str| -> Option<(u64, u64)> {
        let field = |prefix: &str, suffix: &str| -> Option<u64> {
            text.lines().find_map(|line| line.trim().strip_prefix(prefix)?.trim().trim_end_matches(suffix).trim().parse().ok())
        };
        Some((field("now at ", "nsecs")?, field("jiffies:", "")?))
    };
    let ((ns0, jiffies0), (ns1, jiffies1)) = (reading(first)?, reading(second)?);
    let elapsed_ns = ns1.checked_sub(ns0).filter(|&ns| ns >= 10_000_000)?;
    let per_second = jiffies1.checked_sub(jiffies0)? as f64 * 1e9 / elapsed_ns as f64;
    let hz = [100u64, 250, 300, 1000].into_iter().min_by(|a, b| (*a as f64 - per_second).abs().total_cmp(&(*b as f64 - per_second).abs()))?;
    // The kernel's TICK_NSEC.
    let ns_per_jiffy = (1_000_000_000 + hz / 2) / hz;
    Some(DatapathClock { jiffies_base: jiffies1.wrapping_sub(ns1 / ns_per_jiffy), ns_per_jiffy: ns_per_jiffy as u32, _pad: 0 })
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Entries asked for per batch syscall.
const BATCH: usize = 8192;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

impl BatchAttr {
    /// `count` entries of `fd`'s map at `keys` (and `values`: 0 for none).
    fn new<K>(fd: BorrowedFd<'_>, keys: *const K, values: u64, count: usize) -> Self {
        Self { keys: keys as u64, values, count: count as u32, map_fd: fd.as_raw_fd() as u32, ..Self::default() }
    }
}

fn batch_syscall(cmd: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: the bpf syscall with an attribute block of the size given,
    // whose pointers refer to buffers that outlive the call and hold `count`
    // entries.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut BatchAttr, size_of::<BatchAttr>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Every entry of a conntrack table, read `BATCH` at a time.
pub fn read_all(fd: BorrowedFd<'_>) -> std::io::Result<Vec<(ConntrackKey, ConntrackValue)>> {
    read_all_raw::<ConntrackKey, ConntrackValue>(fd)
}

/// Every entry of a hash map with keys `K` and values `V` (plain data of
/// the map's key and value sizes).
pub fn read_all_raw<K: bytemuck::Pod, V: bytemuck::Pod>(fd: BorrowedFd<'_>) -> std::io::Result<Vec<(K, V)>> {
    let mut entries = Vec::new();
    let mut keys = vec![K::zeroed(); BATCH];
    let mut values = vec![V::zeroed(); BATCH];
    // The hash tables' batch position is a bucket index (u32); room for more.
    let (mut in_batch, mut out_batch) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw mut in_batch as u64 },
            out_batch: &raw mut out_batch as u64,
            ..BatchAttr::new(fd, keys.as_mut_ptr(), values.as_mut_ptr() as u64, keys.len())
        };
        let result = batch_syscall(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let filled = attr.count as usize;
        entries.extend(keys[..filled].iter().copied().zip(values[..filled].iter().copied()));
        match result {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            // One bucket holds more entries than the buffer: a bigger one.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && filled == 0 => {
                keys.resize(keys.len() * 2, K::zeroed());
                values.resize(values.len() * 2, V::zeroed());
                continue;
            }
            Err(e) => return Err(e),
        }
        in_batch = out_batch;
        first = false;
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_NOEXIST: u64 = 1;
/// The kernel's ENOTSUPP, which reaches user space as is: this map type
/// has no lookup-and-delete on this kernel (hash maps have it from 5.14).
const ENOTSUPP: i32 = 524;

/// `union bpf_attr`'s element member.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One element command on `fd`'s map for `key` (and `value`, read or
/// written as the command says).
fn elem_syscall<K, V>(cmd: libc::c_long, fd: BorrowedFd<'_>, key: &K, value: Option<&mut V>, flags: u64) -> std::io::Result<()> {
    let value = value.map_or(0, |v| v as *mut V as u64);
    let mut attr = ElemAttr { map_fd: fd.as_raw_fd() as u32, _pad: 0, key: key as *const K as u64, value, flags };
    // SAFETY: the bpf syscall with an attribute block of the size given;
    // `key` and `value` are plain data of the map's key and value sizes
    // that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, &raw mut attr, size_of::<ElemAttr>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Deletes those of `keys` whose entry is still `stale` when it goes;
/// returns how many went.
///
/// The keys come from a read of the whole table, and the datapath may give
/// a key to a new flow before its deletion (a source NAT port reused, a
/// client reopening its tuple): deleting blindly would take the new flow's
/// entry and leave the flow half translated. So each entry is taken out
/// with its value (BPF_MAP_LOOKUP_AND_DELETE_ELEM) and put back at once
/// when it turns out not to be stale, unless the datapath wrote the key
/// again in between. Without that command (before Linux 5.14) the entry is
/// read again just before its deletion, which leaves a window of one
/// syscall.
pub fn delete_if<K: bytemuck::Pod, V: bytemuck::Pod>(fd: BorrowedFd<'_>, keys: &[K], stale: impl Fn(&K, &V) -> bool) -> std::io::Result<usize> {
    let mut deleted = 0;
    let mut atomic = true;
    for key in keys {
        let mut value = V::zeroed();
        if atomic {
            match elem_syscall(BPF_MAP_LOOKUP_AND_DELETE_ELEM, fd, key, Some(&mut value), 0) {
                Ok(()) if stale(key, &value) => deleted += 1,
                Ok(()) => match elem_syscall(BPF_MAP_UPDATE_ELEM, fd, key, Some(&mut value), BPF_NOEXIST) {
                    // Written again by the datapath meanwhile: its entry is newer.
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(e),
                },
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) if matches!(e.raw_os_error(), Some(ENOTSUPP | libc::EINVAL | libc::EOPNOTSUPP)) => {
                    atomic = false;
                    deleted += delete_if_still(fd, key, &stale)?;
                }
                Err(e) => return Err(e),
            }
        } else {
            deleted += delete_if_still(fd, key, &stale)?;
        }
    }
    Ok(deleted)
}

/// `key`'s entry read again and deleted if still `stale`: 1 if it went.
fn delete_if_still<K: bytemuck::Pod, V: bytemuck::Pod>(fd: BorrowedFd<'_>, key: &K, stale: &impl Fn(&K, &V) -> bool) -> std::io::Result<usize> {
    let mut value = V::zeroed();
    match elem_syscall(BPF_MAP_LOOKUP_ELEM, fd, key, Some(&mut value), 0) {
        Ok(()) if stale(key, &value) => match elem_syscall::<_, V>(BPF_MAP_DELETE_ELEM, fd, key, None, 0) {
            Ok(()) => Ok(1),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(0),
            Err(e) => Err(e),
        },
        Ok(()) => Ok(0),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Writes `entries`, `BATCH` at a time; returns how many were written
/// before the map was full.
pub fn write_all<K: bytemuck::Pod, V: bytemuck::Pod>(fd: BorrowedFd<'_>, entries: &[(K, V)]) -> std::io::Result<usize> {
    let mut written = 0;
    for chunk in entries.chunks(BATCH) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr::new(fd, keys.as_ptr(), values.as_ptr() as u64, keys.len());
        let result = batch_syscall(BPF_MAP_UPDATE_BATCH, &mut attr);
        written += attr.count as usize;
        match result {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) || e.raw_os_error() == Some(libc::ENOMEM) => return Ok(written),
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// As `write_all`, from one thread per CPU, each writing its share: with
/// per-CPU LRU lists (BPF_F_NO_COMMON_LRU) a CPU's writes fill only its own
/// list, so one writer could keep no more than its CPU's share of the
/// table and would silently evict the rest.
pub fn write_all_spread<K: bytemuck::Pod + Send + Sync, V: bytemuck::Pod + Send + Sync>(fd: BorrowedFd<'_>, entries: &[(K, V)]) -> std::io::Result<usize> {
    let cpus = aya::util::online_cpus().map_err(|(_, e)| e)?;
    if cpus.len() <= 1 || entries.is_empty() {
        return write_all(fd, entries);
    }
    let share = entries.len().div_ceil(cpus.len());
    std::thread::scope(|scope| {
        let writers: Vec<_> = entries
            .chunks(share)
            .zip(&cpus)
            .map(|(chunk, &cpu)| {
                scope.spawn(move || {
                    pin_thread_to_cpu(cpu as usize)?;
                    write_all(fd, chunk)
                })
            })
            .collect();
        writers.into_iter().map(|w| w.join().map_err(|_| std::io::Error::other("a writer thread panicked"))?).sum()
    })
}

/// Runs the calling thread on `cpu` only: with per-CPU LRU lists, which
/// CPU writes an entry decides whose list it fills.
pub fn pin_thread_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a cpu_set_t we own, filled by the libc macros, for this thread.
    let pinned = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if pinned == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Deletes every entry of the table for which `stale` holds; returns how
/// many went.
pub fn purge<K: bytemuck::Pod, V: bytemuck::Pod>(fd: BorrowedFd<'_>, stale: impl Fn(&K, &V) -> bool) -> std::io::Result<usize> {
    let keys: Vec<K> = read_all_raw::<K, V>(fd)?.into_iter().filter(|(k, v)| stale(k, v)).map(|(k, _)| k).collect();
    delete_if(fd, &keys, stale)
}

/// What one garbage collection pass found and did.
#[derive(Clone, Debug, Default)]
pub struct GcPass {
    /// Live entries after the pass, by protocol ("TCP", "UDP") and state
    /// (`lifecycle::STATE_NAMES`).
    pub entries: Vec<(&'static str, &'static str, u64)>,
    /// Live entries after the pass, by table.
    pub tables: Vec<(&'static str, u64)>,
    /// Entries deleted as expired.
    pub deleted: u64,
    /// How long the pass took.
    pub duration: Duration,
    /// The fullest table's fill, 0 to 1.
    pub fill: f64,
}

/// The collector's figures, for `/metrics`.
#[derive(Debug, Default)]
pub struct GcStats {
    pub last: RwLock<Option<GcPass>>,
    pub deleted_total: std::sync::atomic::AtomicU64,
    pub passes: std::sync::atomic::AtomicU64,
    pub capacity: RwLock<Vec<TableCapacity>>,
}

/// Entries a conntrack table holds, and what one CPU's LRU list holds of
/// that.
#[derive(Clone, Copy, Debug)]
pub struct TableCapacity {
    pub table: &'static str,
    pub total: u32,
    pub per_cpu: u32,
}

/// How often the collector runs: faster as tables fill or much expires,
/// slower while little does.
#[derive(Clone, Copy, Debug)]
pub struct GcInterval {
    pub min: Duration,
    pub max: Duration,
}

impl GcInterval {
    /// The interval after a pass that ran `current` after the previous one.
    pub fn next(&self, current: Duration, pass: &GcPass) -> Duration {
        let live: u64 = pass.entries.iter().map(|(_, _, n)| n).sum();
        let deleted_share = pass.deleted as f64 / (live + pass.deleted).max(1) as f64;
        let next = if pass.fill > 0.5 || deleted_share > 0.25 {
            current / 2
        } else if pass.fill < 0.25 && deleted_share < 0.05 {
            current * 2
        } else {
            current
        };
        next.clamp(self.min, self.max)
    }
}

impl Default for GcInterval {
    fn default() -> Self {
        Self { min: Duration::from_secs(1), max: Duration::from_secs(60) }
    }
}

/// A conntrack table for a collection pass.
pub struct Table<'a> {
    pub name: &'static str,
    pub proto: u8,
    pub fd: BorrowedFd<'a>,
    pub capacity: u32,
    /// An IPv6 table (keys and values over `Ipv6`).
    pub ipv6: bool,
}

/// Both families' conntrack tables: (name, protocol, IPv6).
fn all_tables() -> impl Iterator<Item = (&'static str, u8, bool)> {
    CONNTRACK_MAPS.into_iter().map(|(name, proto)| (name, proto, false)).chain(CONNTRACK_MAPS_V6.into_iter().map(|(name, proto)| (name, proto, true)))
}

/// One pass over the tables pinned under `dir`: deletes the entries expired
/// at `now` and counts the others by state.
pub fn collect(dir: &Path, now: u32) -> Result<GcPass> {
    let mut maps = Vec::new();
    for (name, proto, ipv6) in all_tables() {
        let capacity = MapInfo::from_pin(dir.join(name)).map(|info| info.max_entries()).unwrap_or(u32::MAX);
        maps.push((name, proto, open_pinned(dir, name)?, capacity, ipv6));
    }
    let tables: Vec<Table<'_>> =
        maps.iter().map(|&(name, proto, ref map, capacity, ipv6)| Table { name, proto, fd: map.fd().as_fd(), capacity, ipv6 }).collect();
    collect_tables(&tables, now)
}

/// One pass over `tables`, as `collect`.
pub fn collect_tables(tables: &[Table<'_>], now: u32) -> Result<GcPass> {
    let started = Instant::now();
    let mut pass = GcPass::default();
    for table in tables {
        let (name, proto) = (table.name, table.proto);
        let (by_state, live) = if table.ipv6 { collect_table::<Ipv6>(table, now, &mut pass)? } else { collect_table::<u32>(table, now, &mut pass)? };
        pass.tables.push((name, live));
        let protocol = if proto == IPPROTO_TCP { "TCP" } else { "UDP" };
        let tcp = proto == IPPROTO_TCP;
        for (state, count) in STATE_NAMES.iter().zip(by_state) {
            // TCP states for the TCP tables, UDP states for the UDP one;
            // the two TCP tables summed.
            if state.starts_with("udp_") == tcp {
                continue;
            }
            match pass.entries.iter_mut().find(|(p, s, _)| *p == protocol && s == state) {
                Some(entry) => entry.2 += count,
                None => pass.entries.push((protocol, state, count)),
            }
        }
    }
    pass.duration = started.elapsed();
    Ok(pass)
}

/// One table's pass: deletes its expired entries (counted in `pass`);
/// returns its live entries by state (`STATE_NAMES`) and in all.
fn collect_table<A: IpAddress>(table: &Table<'_>, now: u32, pass: &mut GcPass) -> Result<([u64; STATE_NAMES.len()], u64)>
where
    ConntrackKey<A>: bytemuck::Pod,
    ConntrackValue<A>: bytemuck::Pod,
{
    let Table { name, proto, fd, capacity, .. } = *table;
    let entries = read_all_raw::<ConntrackKey<A>, ConntrackValue<A>>(fd).map_err(|source| Error::Io { what: format!("reading {name}"), source })?;
    pass.fill = pass.fill.max(entries.len() as f64 / f64::from(capacity.max(1)));
    let mut by_state = [0u64; STATE_NAMES.len()];
    let mut expired = Vec::new();
    for (key, value) in &entries {
        if is_alive(value.expires, now) {
            let state = state_name(proto, value.flow_flags);
            if let Some(i) = STATE_NAMES.iter().position(|s| *s == state) {
                by_state[i] += 1;
            }
        } else {
            expired.push(*key);
        }
    }
    let still_expired = |_: &ConntrackKey<A>, value: &ConntrackValue<A>| !is_alive(value.expires, now);
    pass.deleted += delete_if(fd, &expired, still_expired).map_err(|source| Error::Io { what: format!("deleting from {name}"), source })? as u64;
    Ok((by_state, (entries.len() - expired.len()) as u64))
}

fn open_pinned(dir: &Path, name: &'static str) -> Result<MapData> {
    MapData::from_pin(dir.join(name)).map_err(|source| Error::Map { name, source })
}

/// Each conntrack table's capacity, and one CPU's share of it: with per-CPU
/// LRU lists (BPF_F_NO_COMMON_LRU) a CPU evicts from its own list once
/// the flows it recorded fill its share.
pub fn capacities(dir: &Path) -> Vec<TableCapacity> {
    let cpus = aya::util::nr_cpus().unwrap_or(1).max(1) as u32;
    all_tables()
        .filter_map(|(name, _, _)| {
            let info = MapInfo::from_pin(dir.join(name)).ok()?;
            Some(TableCapacity { table: name, total: info.max_entries(), per_cpu: info.max_entries() / cpus })
        })
        .collect()
}

/// Runs the collector on its own thread until the process ends: the agent's
/// runtime (syncs, `/healthz`) never waits for a pass over full tables.
pub fn spawn_collector(dir: PathBuf, stats: Arc<GcStats>, interval: GcInterval) -> std::io::Result<()> {
    use std::sync::atomic::Ordering;
    if let Ok(mut capacity) = stats.capacity.write() {
        *capacity = capacities(&dir);
    }
    std::thread::Builder::new().name("conntrack-gc".into()).spawn(move || {
        let mut current = interval.min.max(Duration::from_secs(5)).min(interval.max);
        loop {
            match collect(&dir, now_ticks()) {
                Ok(pass) => {
                    if pass.deleted > 0 {
                        debug!(deleted = pass.deleted, took = ?pass.duration, fill = pass.fill, "conntrack garbage collected");
                    }
                    if pass.fill > 0.9 {
                        warn!(fill = format!("{:.0}%", pass.fill * 100.0), "a conntrack table is nearly full: raise --conntrack-tcp-max/--conntrack-udp-max");
                    }
                    stats.deleted_total.fetch_add(pass.deleted, Ordering::Relaxed);
                    stats.passes.fetch_add(1, Ordering::Relaxed);
                    current = interval.next(current, &pass);
                    if let Ok(mut last) = stats.last.write() {
                        *last = Some(pass);
                    }
                }
                Err(e) => warn!("conntrack garbage collection: {e}"),
            }
            std::thread::sleep(current);
        }
    })?;
    info!(min = ?interval.min, max = ?interval.max, "conntrack garbage collection running");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(live: u64, deleted: u64, fill: f64) -> GcPass {
        GcPass { entries: vec![("TCP", "established", live)], tables: Vec::new(), deleted, duration: Duration::ZERO, fill }
    }

    #[test]
    fn the_clock_conversion_comes_from_the_timer_list() {
        let list = |ns: u64, jiffies: u64| format!("Timer List Version: v0.10\nnow at {ns} nsecs\n\ncpu: 0\n jiffies: {jiffies}\n");
        let at = |hz: u64, secs: f64| ((secs * 1e9) as u64, (1u64 << 32) - 300 * hz + (secs * hz as f64) as u64);
        let cases = [
            ("HZ 250, 88 minutes up", 250, 5306.0, 0.1),
            ("HZ 1000, at 300 s up, where jiffies pass 2^32", 1000, 300.0, 0.1),
            ("HZ 300, just booted", 300, 0.5, 0.1),
            ("HZ 100, a day up", 100, 86_400.0, 0.1),
        ];
        for (rule, hz, secs, apart) in cases {
            let ((ns0, j0), (ns1, j1)) = (at(hz, secs), at(hz, secs + apart));
            let clock = clock_from_timer_lists(&list(ns0, j0), &list(ns1, j1)).unwrap_or_else(|| panic!("{rule}: no clock"));
            assert_eq!(u64::from(clock.ns_per_jiffy), (1_000_000_000 + hz / 2) / hz, "{rule}");
            let ticks = clock.ticks(j1);
            assert!(ticks.abs_diff(lb_common::lifecycle::ticks_from_ns(ns1)) <= 1, "{rule}: {ticks} ticks at {ns1} ns");
        }
        assert!(clock_from_timer_lists("now at 1 nsecs\n", "now at 2 nsecs\n").is_none(), "no jiffies line");
        assert!(clock_from_timer_lists(&list(1_000_000_000, 5), &list(1_000_000_001, 6)).is_none(), "reads too close together");
    }

    #[test]
    fn the_collector_speeds_up_when_tables_fill_or_much_expires() {
        let interval = GcInterval { min: Duration::from_secs(1), max: Duration::from_secs(60) };
        let ten = Duration::from_secs(10);
        let cases = [
            ("over half full: twice as often", pass(600, 0, 0.6), Duration::from_secs(5)),
            ("a third of the entries expired: twice as often", pass(60, 40, 0.1), Duration::from_secs(5)),
            ("nearly empty, little expired: half as often", pass(100, 1, 0.01), Duration::from_secs(20)),
            ("in between: unchanged", pass(100, 10, 0.3), ten),
        ];
        for (rule, pass, want) in cases {
            assert_eq!(interval.next(ten, &pass), want, "{rule}");
        }
        assert_eq!(interval.next(Duration::from_secs(1), &pass(1, 0, 0.9)), Duration::from_secs(1), "never below the minimum");
        assert_eq!(interval.next(Duration::from_secs(60), &pass(1, 0, 0.0)), Duration::from_secs(60), "never above the maximum");
    }
}
