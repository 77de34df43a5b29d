//! Network namespaces for guests with a network interface: each holds a
//! persistent tap named [`TAP`] with the host side of the guest's link, so
//! every child of a snapshot finds the same tap, MAC and addresses its
//! parent had, and no two children share a link.
//!
//! Made by syscall ([`netif`]) the way `ip netns add` makes them, so `ip
//! netns exec` and every other tool see them.

use std::net::Ipv4Addr;

use proto::api::{GUEST_ADDR, HOST_ADDR, NET_PREFIX};

use crate::store::{Store, StoreError};

/// Why a namespace could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The store already records one of this name.
    #[error("network namespace {0} is already this daemon's (a clash of random names; retry)")]
    Taken(String),
    /// The store could not record it.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The kernel refused (a foreign namespace of that name, no
    /// /dev/net/tun, no CAP_NET_ADMIN).
    #[error("cannot make network namespace {name}: {source}")]
    Make {
        /// Its name.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The tap in every namespace (the name the snapshot's interface records).
pub const TAP: &str = "forkd0";
/// The guest's MAC address (kept by every child: the guest has it).
pub const GUEST_MAC: &str = "06:00:ac:10:00:02";
/// The tap's MAC address. Fixed, because a restored guest's ARP cache
/// holds the parent's: a child's tap with another MAC would drop the
/// guest's frames.
pub const HOST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x01];

/// The kernel parameter that has forkd-agent configure the guest's side.
pub fn guest_kernel_arg() -> String {
    format!("forkd.net={GUEST_ADDR}/{NET_PREFIX},{HOST_ADDR}")
}

/// The host side of a guest's link, as every child's namespace repeats
/// it: the tap's name (the one the snapshot records), its MAC (in the
/// guest's ARP cache) and its address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapSpec {
    /// Its name.
    pub name: String,
    /// Its MAC address.
    pub mac: [u8; 6],
    /// Its IPv4 address and prefix length, if it has one.
    pub addr: Option<(Ipv4Addr, u8)>,
}

impl TapSpec {
    /// forkd's own link: [`TAP`], [`HOST_MAC`], [`HOST_ADDR`].
    pub fn forkd() -> TapSpec {
        TapSpec {
            name: TAP.to_owned(),
            mac: HOST_MAC,
            addr: Some((HOST_ADDR.parse().expect("a valid constant"), NET_PREFIX)),
        }
    }

    /// The host tap `name` in the daemon's namespace, as it is now (a
    /// snapshot made on it records this).
    pub fn of_host_tap(name: &str) -> std::io::Result<TapSpec> {
        netif::check_ifname(name)?;
        Ok(TapSpec {
            name: name.to_owned(),
            mac: netif::iface::mac(name)?,
            addr: netif::iface::ipv4(name)?,
        })
    }

    /// The address as `a.b.c.d/p` (what the store keeps).
    pub fn addr_text(&self) -> Option<String> {
        self.addr.map(|(a, p)| format!("{a}/{p}"))
    }

    /// From the store's columns; `None` when they do not parse.
    pub fn from_columns(name: &str, mac: &str, addr: Option<&str>) -> Option<TapSpec> {
        let mac = proto::snapshot::parse_mac(mac)?;
        let addr = match addr {
            None => None,
            Some(text) => {
                let (a, p) = text.split_once('/')?;
                Some((a.parse().ok()?, p.parse().ok().filter(|p| *p <= 32)?))
            }
        };
        Some(TapSpec {
            name: name.to_owned(),
            mac,
            addr,
        })
    }
}

/// Makes namespace `name` with loopback up and forkd's tap ([`TAP`])
/// holding the host side of the guest's link, up (see [`create_with`]).
pub fn create(store: &Store, name: &str) -> Result<(), Error> {
    create_with(store, name, &TapSpec::forkd())
}

/// Makes namespace `name` with loopback up and the tap `tap` describes,
/// up; recorded in `store` first, so a restart after a crash finds it
/// ([`remove_orphans`]). A half-made namespace is removed.
pub fn create_with(store: &Store, name: &str, tap: &TapSpec) -> Result<(), Error> {
    if !store.add_netns(name)? {
        return Err(Error::Taken(name.to_owned()));
    }
    let made = netif::netns::create(name, || {
        netif::iface::set_up("lo")?;
        netif::tun::create_persistent_tap(&tap.name)?;
        netif::iface::set_mac(&tap.name, tap.mac)?;
        if let Some((addr, prefix)) = tap.addr {
            netif::iface::set_ipv4(&tap.name, addr, prefix)?;
        }
        netif::iface::set_up(&tap.name)
    })
    .map_err(|source| Error::Make {
        name: name.to_owned(),
        source,
    });
    if made.is_err() {
        let _ = store.remove_netns(name);
    }
    made
}

/// Removes namespace `name` and its tap, and its record; one already gone
/// is fine, a failure is logged (and the record kept for the next start).
pub fn remove(store: &Store, name: &str) {
    if let Err(e) = netif::netns::remove(name) {
        tracing::warn!("cannot remove network namespace {name}: {e}");
        return;
    }
    if let Err(e) = store.remove_netns(name) {
        tracing::warn!("cannot forget network namespace {name}: {e}");
    }
}

/// How the names of the namespaces a daemon makes begin: `forkd-` and its
/// instance id, so a daemon reconciles only its own.
pub fn prefix(instance: &str) -> String {
    format!("forkd-{instance}-")
}

/// Where named network namespaces are.
const NETNS_DIR: &str = "/var/run/netns";

/// Removes the namespaces named with `prefix` (this daemon's) that the
/// store has no record of (made by a daemon whose database was lost or
/// rolled back); their names.
pub fn remove_unrecorded(store: &Store, prefix: &str) -> Result<Vec<String>, StoreError> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Ok(removed);
    };
    for entry in entries.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !name.starts_with(prefix) || store.netns_recorded(&name)? {
            continue;
        }
        match netif::netns::remove(&name) {
            Ok(()) => removed.push(name),
            Err(e) => tracing::warn!("cannot remove network namespace {name}: {e}"),
        }
    }
    Ok(removed)
}

/// Removes the namespaces this daemon made that no sandbox names (left by
/// a crash in the middle of a spawn or a snapshot); how many.
pub fn remove_orphans(store: &Store) -> Result<usize, StoreError> {
    let orphans = store.orphan_netns()?;
    for name in &orphans {
        remove(store, name);
    }
    Ok(orphans.len())
}

/// Namespaces, all or none: removed when dropped unless kept.
pub struct Namespaces<'a> {
    store: &'a Store,
    names: Vec<String>,
}

impl<'a> Namespaces<'a> {
    /// None yet, recorded in `store`.
    pub fn new(store: &'a Store) -> Self {
        Namespaces {
            store,
            names: Vec::new(),
        }
    }

    /// Takes over namespaces made already (a [`Pool`]'s).
    pub fn adopt(&mut self, names: Vec<String>) {
        self.names.extend(names);
    }

    /// Creates `name` with forkd's tap, removed with the rest if this set
    /// is dropped.
    pub fn add(&mut self, name: String) -> Result<(), Error> {
        self.add_with(name, &TapSpec::forkd())
    }

    /// Creates `name` with the tap `tap` describes, removed with the rest
    /// if this set is dropped.
    pub fn add_with(&mut self, name: String, tap: &TapSpec) -> Result<(), Error> {
        create_with(self.store, &name, tap)?;
        self.names.push(name);
        Ok(())
    }

    /// The names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Keeps them: their owners remove them.
    pub fn keep(mut self) {
        self.names.clear();
    }
}

impl Drop for Namespaces<'_> {
    fn drop(&mut self) {
        for name in &self.names {
            remove(self.store, name);
        }
    }
}

/// Namespaces made ahead of spawns (`forkd-daemon serve --netns-pool N`),
/// so a networked spawn of up to N children makes none on its request
/// path. Each is recorded like any other: one left by a crash is an
/// orphan at the next start.
pub struct Pool {
    target: usize,
    prefix: String,
    ready: std::sync::Mutex<Vec<String>>,
    refilling: std::sync::atomic::AtomicBool,
    closed: std::sync::atomic::AtomicBool,
}

impl Pool {
    /// A pool that keeps `target` namespaces ready (0: none), their
    /// names starting with `prefix` (see [`prefix`]).
    pub fn new(target: usize, prefix: String) -> Pool {
        Pool {
            target,
            prefix,
            ready: std::sync::Mutex::new(Vec::new()),
            refilling: std::sync::atomic::AtomicBool::new(false),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether it keeps any.
    pub fn enabled(&self) -> bool {
        self.target > 0
    }

    fn ready(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Up to `n` ready namespaces, now the caller's.
    pub fn take(&self, n: usize) -> Vec<String> {
        let mut ready = self.ready();
        let k = n.min(ready.len());
        ready.drain(..k).collect()
    }

    /// How many are ready.
    pub fn len(&self) -> usize {
        self.ready().len()
    }

    /// Whether none is ready.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes namespaces until `target` are ready (blocking); returns at
    /// once if another refill runs. A failure is logged and ends it.
    pub fn refill(&self, store: &Store) {
        use std::sync::atomic::Ordering;
        if !self.enabled() || self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        while self.len() < self.target && !self.closed.load(Ordering::Acquire) {
            let name = format!("{}p{}", self.prefix, crate::util::random_hex(4));
            if let Err(e) = create(store, &name) {
                tracing::warn!("network namespace pool: {e}");
                break;
            }
            self.ready().push(name);
        }
        self.refilling.store(false, Ordering::Release);
    }

    /// Stops refilling (waiting out a refill that runs) and removes the
    /// ready ones (at shutdown).
    pub fn drain(&self, store: &Store) {
        use std::sync::atomic::Ordering;
        self.closed.store(true, Ordering::Release);
        while self.refilling.load(Ordering::Acquire) {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        for name in self.take(usize::MAX) {
            remove(store, &name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A state database of its own for one test.
    fn store(tag: &str) -> (std::path::PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!("forkd-netns-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("forkd.db")).unwrap();
        (dir, store)
    }

    /// A namespace holds the tap with the host's address and MAC, up;
    /// removing it takes the tap along and forgets it; a second one of the
    /// same name is refused, and the refusal leaves the first recorded.
    #[test]
    fn a_namespace_holds_the_configured_tap() {
        let (dir, store) = store("tap");
        let name = format!("forkd-test-ns-{}", std::process::id());
        let _ = netif::netns::remove(&name);
        create(&store, &name).expect("root and /dev/net/tun");
        let show = Command::new("ip")
            .args(["-n", &name, "-o", "addr", "show", "dev", TAP])
            .output()
            .unwrap();
        let addrs = String::from_utf8_lossy(&show.stdout).into_owned();
        let link = Command::new("ip")
            .args(["-n", &name, "-o", "link", "show", "dev", TAP])
            .output()
            .unwrap();
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        let again = create(&store, &name);
        let recorded = store.orphan_netns().unwrap();
        remove(&store, &name);
        assert!(
            addrs.contains(&format!("{HOST_ADDR}/{NET_PREFIX}")),
            "{addrs}"
        );
        assert!(
            link.contains("06:00:ac:10:00:01") && link.contains(",UP"),
            "{link}"
        );
        assert!(matches!(again, Err(Error::Taken(_))), "{again:?}");
        assert_eq!(recorded, std::slice::from_ref(&name));
        assert!(!netif::netns::path(&name).exists());
        assert!(store.orphan_netns().unwrap().is_empty());
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A namespace made outside this daemon under a name it would use is
    /// refused, and not recorded.
    #[test]
    fn a_foreign_namespace_of_the_same_name_is_refused() {
        let (dir, store) = store("foreign");
        let name = format!("forkd-test-foreign-{}", std::process::id());
        netif::netns::create(&name, || Ok(())).unwrap();
        let err = create(&store, &name).unwrap_err();
        let recorded = store.orphan_netns().unwrap();
        netif::netns::remove(&name).unwrap();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert!(recorded.is_empty(), "{recorded:?}");
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// What a crash leaves (made and recorded, named by no sandbox) is
    /// removed by [`remove_orphans`].
    #[test]
    fn orphans_are_removed() {
        let (dir, store) = store("orphans");
        let name = format!("forkd-test-orphan-{}", std::process::id());
        let _ = netif::netns::remove(&name);
        // Made and recorded, and then the daemon "crashed": no guard
        // removed it and no sandbox names it.
        create(&store, &name).unwrap();
        assert_eq!(remove_orphans(&store).unwrap(), 1);
        assert!(!netif::netns::path(&name).exists());
        assert!(store.orphan_netns().unwrap().is_empty());
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A pool fills to its target, hands out what it has, refills, and
    /// removes what is left when drained.
    #[test]
    fn a_pool_fills_hands_out_and_drains() {
        let (dir, store) = store("pool");
        let pool = Pool::new(3, "forkd-test-".into());
        pool.refill(&store);
        assert_eq!(pool.len(), 3);
        let taken = pool.take(2);
        assert_eq!((taken.len(), pool.len()), (2, 1));
        assert!(taken.iter().all(|n| netif::netns::path(n).exists()));
        pool.refill(&store);
        assert_eq!(pool.len(), 3);
        pool.drain(&store);
        assert!(pool.is_empty());
        pool.refill(&store);
        assert!(pool.is_empty(), "a drained pool refilled");
        // What was handed out is the taker's to remove; nothing else is left.
        assert_eq!(store.orphan_netns().unwrap(), {
            let mut t = taken.clone();
            t.sort();
            t
        });
        for n in &taken {
            remove(&store, n);
        }
        assert!(store.orphan_netns().unwrap().is_empty());
        assert!(Pool::new(0, "forkd-test-".into()).take(5).is_empty());
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_set_of_namespaces_leaves_none() {
        let (dir, store) = store("set");
        let base = format!("forkd-test-set-{}", std::process::id());
        let mut set = Namespaces::new(&store);
        set.add(format!("{base}-a")).unwrap();
        // An invalid name: a slash.
        assert!(set.add(format!("{base}/b")).is_err());
        assert_eq!(set.names().len(), 1);
        drop(set);
        assert!(!netif::netns::path(&format!("{base}-a")).exists());
        assert!(store.orphan_netns().unwrap().is_empty());
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
