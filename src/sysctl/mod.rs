//! The sysctl engine: key grammar and scope, the built-in policy, reading and writing
//! `/proc/sys`, the baseline ledger of original values, applying and restoring, and cross-key
//! warnings.
//!
//! Everything apart from [`procfs`] and [`ledger`] is pure. A typical agent step:
//!
//! ```no_run
//! use std::collections::BTreeMap;
//! use nodetune::sysctl::{self, Ledger, SysctlFs};
//!
//! let fs = SysctlFs::default(); // /proc/sys
//! let loaded = Ledger::load(sysctl::DEFAULT_STATE_DIR)?;
//! if let Some(aside) = &loaded.set_aside {
//!     eprintln!("corrupt ledger moved to {}: {}", aside.moved_to.display(), aside.reason);
//! }
//! let mut ledger = loaded.ledger;
//! let policy = sysctl::Policy::default(); // built-in rules; or Policy::from_file(..)
//! let desired = BTreeMap::from([("net.ipv4.tcp_fin_timeout", "30")]);
//! for w in sysctl::checks::check(&desired, None) {
//!     eprintln!("warning: {}: {}", w.key, w.message);
//! }
//! for (key, value) in &desired {
//!     let r = sysctl::apply_one(&fs, &mut ledger, key, value, Some("web"), &policy);
//!     println!("{} {:?} {:?}", r.key, r.state, r.message);
//! }
//! # Ok::<(), sysctl::LedgerError>(())
//! ```

pub(crate) mod apply;
pub mod boot;
pub mod checks;
pub mod hostconf;
pub(crate) mod input;
pub mod key;
pub mod ledger;
pub mod policy;
pub(crate) mod procfs;
pub mod scope;
pub(crate) mod state_dir;
pub(crate) mod suggest;
pub mod value;
pub(crate) mod vocab;

pub use apply::{
    KeyResult, apply_one, dry_run_one, restore_all, restore_key, restore_keys, unsupported_message,
};
pub use checks::Warning;
pub use key::{KEY_MAX_LEN, KEY_PATTERN, KeyError, SysctlKey, parse_spec};
pub use ledger::{DEFAULT_STATE_DIR, Ledger, LedgerEntry, LedgerError, LoadOutcome, SetAside};
pub use policy::{Policy, PolicyError, PolicyViolation, Refusal, SysctlPolicy};
pub use procfs::{SysctlFs, SysctlIoError};
pub use vocab::{KeyState, Scope};
