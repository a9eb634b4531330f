//! What this process may allocate and has used, from Linux's `/proc` and cgroup files
//! (`None` elsewhere or when a file is unreadable).

/// Memory the process could use when first asked: the smaller of the system's available
/// memory, its cgroup's limit and the room under its address-space limit (`ulimit -v`). A
/// tensor larger than that would abort in the allocator, or push the machine into swap,
/// before any error could be reported.
pub fn available() -> Option<usize> {
    static AVAILABLE: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let system = kib("/proc/meminfo", "MemAvailable:")?.saturating_mul(1024);
        let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        Some(
            [cgroup, address_space_left()]
                .into_iter()
                .flatten()
                .fold(system, usize::min),
        )
    })
}

/// Peak resident memory of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    kib("/proc/self/status", "VmHWM:").map(|k| k as f64 / 1024.0)
}

/// Room left under the process's address-space limit (`ulimit -v`), if it has one.
fn address_space_left() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let limit: usize = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max address space"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let used = kib("/proc/self/status", "VmSize:")?.saturating_mul(1024);
    Some(limit.saturating_sub(used))
}

/// The `key` line of a `/proc` file such as `MemAvailable:   22889392 kB`, in KiB.
fn kib(path: &str, key: &str) -> Option<usize> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn linux_reports_memory() {
        assert!(super::available().is_some_and(|b| b > 1 << 20));
        assert!(super::peak_rss_mib().is_some_and(|m| m > 0.0));
    }
}
