//! The cluster policy reader: never panics, and a policy that compiles checks keys without
//! panicking.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nodetune::sysctl::{SysctlKey, SysctlPolicy};

fuzz_target!(|text: &str| {
    if let Ok(policy) = SysctlPolicy::parse(text).and_then(|p| p.compile()) {
        for key in ["net.ipv4.tcp_fin_timeout", "vm.swappiness", "kernel.shmmax"] {
            let _ = policy.check(&SysctlKey::parse(key).expect("valid"), "1");
        }
    }
});
