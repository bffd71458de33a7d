//! CPU cap and weight of a VM, through the host's cgroups: its process goes into a cgroup of its own —
//! `porthole/vm-<id>` under the daemon's own cgroup for the daemon's VMs, `porthole/vm-hand-<pid>` under the
//! caller's for a `porthole-vmm --cpu-cap` started by hand — whose CPU controller files say how much CPU
//! it may use (cap: CFS quota per period) and its share under contention (weight).
//!
//! cgroup v2 (`cpu.max`, `cpu.weight`) where the host has a unified hierarchy with the CPU controller, else
//! the v1 `cpu` hierarchy (`cpu.cfs_quota_us`/`cpu.cfs_period_us`, `cpu.shares`). Where neither can be
//! written (no CPU controller, a read-only /sys/fs/cgroup in a container, a v2 cgroup the daemon was not
//! delegated), the limits are kept but not enforced, and the API says why: never a silent pretence.

use std::path::{Path, PathBuf};

/// The CFS period the cap is a fraction of (100 ms, the kernel's default).
const PERIOD_US: u64 = 100_000;

/// Where the VMs' cgroups go, and which interface they have.
#[derive(Debug, Clone)]
enum Hierarchy {
    V1(PathBuf),
    V2(PathBuf),
}

/// The host's CPU controller as the daemon can use it.
#[derive(Debug, Clone)]
pub struct CpuLimits {
    /// Where the VMs' cgroups go, or why there is nowhere.
    hierarchy: Result<Hierarchy, String>,
}

/// A VM's CPU limits: cap in percent of one CPU (150: one and a half CPUs), weight 1-10000 (100: the
/// default share).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub cap_percent: Option<u32>,
    pub weight: Option<u32>,
}

impl CpuLimits {
    /// Finds the daemon's cgroup and checks that it can make the VMs' cgroups under it.
    pub fn detect() -> CpuLimits {
        CpuLimits {
            hierarchy: find(
                Path::new("/sys/fs/cgroup"),
                &std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
            ),
        }
    }

    /// Whether limits are enforced, and how (or why not), for the API.
    pub fn describe(&self) -> Result<String, String> {
        match &self.hierarchy {
            Ok(Hierarchy::V1(p)) => Ok(format!("cgroup v1 cpu controller ({})", p.display())),
            Ok(Hierarchy::V2(p)) => Ok(format!("cgroup v2 cpu controller ({})", p.display())),
            Err(why) => Err(why.clone()),
        }
    }

    /// VM `id`'s cgroup and whether it is v2, or why there is none.
    fn vm_dir(&self, id: &str) -> Result<(PathBuf, bool), String> {
        match &self.hierarchy {
            Ok(Hierarchy::V1(p)) => Ok((p.join(format!("vm-{id}")), false)),
            Ok(Hierarchy::V2(p)) => Ok((p.join(format!("vm-{id}")), true)),
            Err(why) => Err(why.clone()),
        }
    }

    /// Puts process `pid` (a VM's engine, with every thread it has and will have) into VM `id`'s cgroup
    /// with `limits`. Returns where, or why the limits are not enforced.
    pub fn attach(&self, id: &str, pid: u32, limits: Limits) -> Result<String, String> {
        let (dir, _) = self.vm_dir(id)?;
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        self.set(id, limits)?;
        write(&dir.join("cgroup.procs"), &pid.to_string())?;
        Ok(format!("enforced in {}", dir.display()))
    }

    /// Sets VM `id`'s limits (its cgroup exists: the VM runs).
    pub fn set(&self, id: &str, limits: Limits) -> Result<(), String> {
        let (dir, v2) = self.vm_dir(id)?;
        let quota = limits.cap_percent.map(|p| u64::from(p) * PERIOD_US / 100);
        if v2 {
            let max = quota.map_or("max".to_owned(), |q| q.to_string());
            write(&dir.join("cpu.max"), &format!("{max} {PERIOD_US}"))?;
            write(&dir.join("cpu.weight"), &limits.weight.unwrap_or(100).to_string())?;
        } else {
            write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota.map_or("-1".to_owned(), |q| q.to_string()))?;
            // v1 shares: 1024 is the default share, as weight 100 is v2's.
            let shares = (u64::from(limits.weight.unwrap_or(100)) * 1024 / 100).max(2);
            write(&dir.join("cpu.shares"), &shares.to_string())?;
        }
        Ok(())
    }

    /// Removes VM `id`'s cgroup once its process is gone (an empty cgroup only).
    pub fn remove(&self, id: &str) {
        if let Ok((dir, _)) = self.vm_dir(id) {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Removes the cgroups of VMs whose id starts with `prefix` and whose processes are gone (the kernel
    /// refuses to remove a cgroup that still holds a process, so only the empty ones go): a VMM started
    /// by hand cannot remove its own cgroup when it ends, so the next one cleans up.
    pub fn remove_unused(&self, prefix: &str) {
        let Ok(Hierarchy::V1(parent) | Hierarchy::V2(parent)) = &self.hierarchy else { return };
        let Ok(entries) = std::fs::read_dir(parent) else { return };
        for e in entries.flatten() {
            if e.file_name().to_str().is_some_and(|n| n.starts_with(&format!("vm-{prefix}"))) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

/// The VMs' parent cgroup under the cgroup file system at `root`, for a daemon whose `/proc/self/cgroup`
/// is `own`; made if missing, checked writable.
fn find(root: &Path, own: &str) -> Result<Hierarchy, String> {
    // cgroup v2 at the root (a unified hierarchy with the cpu controller).
    if let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) {
        if !controllers.split_whitespace().any(|c| c == "cpu") {
            return Err("the host's cgroup v2 hierarchy has no cpu controller".into());
        }
        let path = own.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/");
        let mine = root.join(path.trim_start_matches('/'));
        let parent = mine.join("porthole");
        std::fs::create_dir_all(&parent).map_err(|e| {
            format!(
                "cgroup v2: cannot create {} ({e}); run portholed in a unit with Delegate=yes or as root",
                parent.display()
            )
        })?;
        // The cpu controller must be on for the children of both levels.
        for dir in [&mine, &parent] {
            let control = dir.join("cgroup.subtree_control");
            let on = std::fs::read_to_string(&control).unwrap_or_default();
            if !on.split_whitespace().any(|c| c == "cpu") {
                write(&control, "+cpu").map_err(|e| {
                    format!(
                        "cgroup v2: {e} (the daemon's cgroup holds processes: give portholed a delegated cgroup, \
                         e.g. systemd's Delegate=yes)"
                    )
                })?;
            }
        }
        return Ok(Hierarchy::V2(parent));
    }
    // cgroup v1: the cpu hierarchy (alone or with cpuacct).
    let line = own.lines().find(|l| {
        let mut parts = l.splitn(3, ':');
        parts.nth(1).is_some_and(|controllers| controllers.split(',').any(|c| c == "cpu"))
    });
    let Some(line) = line else {
        return Err("the host has no cgroup cpu controller (neither v2 nor a v1 cpu hierarchy)".into());
    };
    let path = line.splitn(3, ':').nth(2).unwrap_or("/");
    let mount =
        ["cpu", "cpu,cpuacct", "cpuacct,cpu"].iter().map(|m| root.join(m)).find(|m| m.join("cpu.shares").exists());
    let Some(mount) = mount else {
        return Err(format!("the cgroup v1 cpu hierarchy is not mounted under {}", root.display()));
    };
    let parent = mount.join(path.trim_start_matches('/')).join("porthole");
    std::fs::create_dir_all(&parent).map_err(|e| format!("cgroup v1: cannot create {} ({e})", parent.display()))?;
    Ok(Hierarchy::V1(parent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v1_host_gets_cgroups_under_the_daemons_own() {
        let root = std::env::temp_dir().join(format!("porthole-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let cpu = root.join("cpu");
        std::fs::create_dir_all(cpu.join("svc")).unwrap();
        std::fs::write(cpu.join("cpu.shares"), "1024").unwrap();
        let own = "4:memory:/x\n1:cpu:/svc\n0::/\n";
        match find(&root, own).unwrap() {
            Hierarchy::V1(p) => assert_eq!(p, cpu.join("svc/porthole")),
            other => panic!("{other:?}"),
        }
        let limits = CpuLimits { hierarchy: find(&root, own) };
        // (A plain directory stands for the cgroup: the files are what the kernel would read.)
        std::fs::create_dir_all(cpu.join("svc/porthole/vm-a")).unwrap();
        limits.set("a", Limits { cap_percent: Some(150), weight: Some(50) }).unwrap();
        let read = |f: &str| std::fs::read_to_string(cpu.join("svc/porthole/vm-a").join(f)).unwrap();
        assert_eq!(
            (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us"), read("cpu.shares")),
            ("150000".into(), "100000".into(), "512".into())
        );
        limits.set("a", Limits::default()).unwrap();
        assert_eq!((read("cpu.cfs_quota_us"), read("cpu.shares")), ("-1".into(), "1024".into()));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn without_a_cpu_controller_the_limits_say_why() {
        let root = std::env::temp_dir().join(format!("porthole-cgroup-none-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let e = find(&root, "4:memory:/x\n0::/\n").unwrap_err();
        assert!(e.contains("no cgroup cpu controller"), "{e}");
        std::fs::write(root.join("cgroup.controllers"), "memory pids").unwrap();
        assert!(find(&root, "0::/\n").unwrap_err().contains("no cpu controller"));
        let limits = CpuLimits { hierarchy: find(&root, "0::/\n") };
        assert!(limits.attach("a", 1, Limits::default()).unwrap_err().contains("no cpu controller"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
