#!/usr/bin/env python3
"""The libvirt calls virt-manager 4.1 makes on its periodic tick, replayed against one libvirt URI.

Written for porthole-bench (`porthole-bench libvirt`); not virt-manager's code. What it replays, as read
in virt-manager 4.1's sources (virtManager/engine.py, connection.py, object/domain.py,
object/libvirtobject.py, lib/statsmanager.py) with its default preferences (update interval 3 s; only CPU
polling on, disk/network/memory polling off):

- On connecting: libvirt's default event loop; domain events registered (lifecycle, then balloon change,
  tray change, device removed, device added, agent lifecycle, metadata change), network and storage pool
  events; every domain listed once and its XML read once (each object's initial state). Not timed.
- Each tick, with domain events working (so `pollvm` is dropped and domains are not listed again):
  the host's node info (`getInfo`), then one `getAllDomainStats(STATE | CPU_TOTAL | VCPU, 0)`, kept by
  UUID; then every known domain's tick: with events no `info()` and no XML read, only its CPU sample taken
  from that reading (running domains: CPU time difference over the time difference, per host CPU and per
  guest CPU); then the connection's totals over the running domains.

Calls are counted on the connection and on the handles it returns, except those that read a handle's own
name or UUID (no call to the daemon), as porthole-libvirt counts them.

Prints one JSON object: ticks, median and each tick's time (ms), calls per tick, setup calls.
"""

import json
import statistics
import sys
import threading
import time

import libvirt

LOCAL = {"UUIDString", "UUID", "name", "ID"}


class Counter:
    calls = 0


class Counted:
    """A libvirt handle whose calls are counted; handles it returns are counted too."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, attr):
        value = getattr(self._obj, attr)
        if not callable(value) or attr in LOCAL:
            return value

        def call(*args, **kwargs):
            Counter.calls += 1
            return wrap(value(*args, **kwargs))

        return call


def wrap(result):
    if isinstance(result, (libvirt.virDomain,)):
        return Counted(result)
    if isinstance(result, list):
        return [wrap(r) for r in result]
    if isinstance(result, tuple):
        return tuple(wrap(r) for r in result)
    return result


def event_loop():
    while True:
        libvirt.virEventRunDefaultImpl()


def ignore(*_args):
    return 0


class Domain:
    """What the tick keeps per domain: its UUID, XML, last CPU sample."""

    def __init__(self, dom):
        self.dom = dom
        self.uuid = dom.UUIDString()
        self.xml = dom.XMLDesc(0)
        self.samples = []

    def tick(self, allstats, host_cpus):
        stats = allstats.get(self.uuid)
        now = time.time()
        if not stats or stats.get("state.state", 0) in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
            self.samples.insert(0, (now, 0, 0.0, 0.0))
            return
        cpu_abs = stats.get("cpu.time", 0)
        guest_cpus = stats.get("vcpu.current", 0)
        stamp = stats.get("virt-manager.timestamp", now)
        prev_stamp, prev_abs = (self.samples[0][0], self.samples[0][1]) if self.samples else (stamp, cpu_abs)
        elapsed = max(stamp - prev_stamp, 1e-9)
        base = (cpu_abs - prev_abs) * 100.0 / (elapsed * 1e9)
        host_pc = max(0.0, min(100.0, base / max(host_cpus, 1)))
        guest_pc = max(0.0, min(100.0, base / guest_cpus if guest_cpus else 0.0))
        self.samples.insert(0, (stamp, cpu_abs, host_pc, guest_pc))
        del self.samples[120:]


def main():
    uri, ticks, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    libvirt.registerErrorHandler(lambda *_: None, None)
    libvirt.virEventRegisterDefaultImpl()
    threading.Thread(target=event_loop, daemon=True).start()
    conn = Counted(libvirt.open(uri))
    for event in (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, 13, 10, 15, 19, 18, 23):
        conn.domainEventRegisterAny(None, event, ignore, None)
    conn.networkEventRegisterAny(None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE, ignore, None)
    conn.storagePoolEventRegisterAny(None, libvirt.VIR_STORAGE_POOL_EVENT_ID_LIFECYCLE, ignore, None)
    conn.storagePoolEventRegisterAny(None, libvirt.VIR_STORAGE_POOL_EVENT_ID_REFRESH, ignore, None)
    domains = [Domain(d) for d in conn.listAllDomains(0)]
    setup_calls = Counter.calls
    flags = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_VCPU
    times, calls, totals = [], [], []
    for _ in range(ticks):
        start, before = time.perf_counter(), Counter.calls
        hostinfo = conn.getInfo()
        stamp = time.time()
        allstats = {}
        for dom, stats in conn.getAllDomainStats(flags, 0):
            stats["virt-manager.timestamp"] = stamp
            allstats[dom.UUIDString()] = stats
        for d in domains:
            d.tick(allstats, hostinfo[2])
        cpu = sum(d.samples[0][2] for d in domains if d.samples)
        totals.insert(0, (stamp, cpu))
        times.append((time.perf_counter() - start) * 1000.0)
        calls.append(Counter.calls - before)
        time.sleep(max(0.0, interval - (time.perf_counter() - start)))
    print(json.dumps({
        "domains": len(domains),
        "ticks": ticks,
        "median_ms": statistics.median(times),
        "times_ms": times,
        "calls_per_tick": statistics.mean(calls),
        "setup_calls": setup_calls,
    }))


if __name__ == "__main__":
    main()
