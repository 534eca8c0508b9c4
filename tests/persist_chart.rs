//! Issue 19: what the chart renders for persistence. `policy.allowPersist: false` reaches the
//! agents' policy file and the admission policy refuses `persist: true`; the default renders
//! neither (an older agent refuses a policy field it does not know). `agent.persist` is what the
//! controller turns into a writable /etc/sysctl.d for the agents.
#[path = "support/helm.rs"]
mod helm;

fn render(helm: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(helm)
        .current_dir(helm::repo_root())
        .args(["template", "nodetune", "charts/nodetune"])
        .args(args)
        .output()
        .expect("helm runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn allow_persist_false_reaches_the_agents_and_admission() {
    let Some(helm) = helm::helm("allow_persist_false_reaches_the_agents_and_admission") else {
        return;
    };
    let default = render(&helm, &[]);
    assert!(!default.contains("    allowPersist:"), "{default}");
    assert!(!default.contains("object.spec.persist"), "{default}");
    assert!(default.contains("name: NODETUNE_AGENT_PERSIST\n              value: \"false\""));

    let forbidden = render(&helm, &["--set", "policy.allowPersist=false"]);
    assert!(
        forbidden.contains("    allowPersist: false\n"),
        "{forbidden}"
    );
    assert!(
        forbidden.contains("!has(object.spec.persist) || !object.spec.persist"),
        "{forbidden}"
    );
    // The agents parse the same policy text the ConfigMap carries.
    let policy = nodetune::sysctl::policy::SysctlPolicy::parse("allowPersist: false\n")
        .expect("parses")
        .compile()
        .expect("compiles");
    assert!(!policy.allows_persist());

    let persisting = render(&helm, &["--set", "agent.persist=true"]);
    assert!(persisting.contains("name: NODETUNE_AGENT_PERSIST\n              value: \"true\""));
}
