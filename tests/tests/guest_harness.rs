#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The guest harness itself: exit status and output come back, the exchange directory works
//! both ways, a hung guest is killed at its timeout and no QEMU outlives its guest.

use std::time::Duration;

use maas_tests::guest::Guest;

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purposes; /proc/PID/stat's third field is the state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn a_script_runs_and_reports_its_status_output_and_files() {
    let xchg = tempfile::tempdir().unwrap();
    std::fs::write(xchg.path().join("from-host"), "host says hi\n").unwrap();
    let g = Guest::new("harness")
        .exchange(xchg.path())
        .env("GREETING", "it's \"quoted\"")
        .timeout(Duration::from_secs(180));
    let mut running = g.spawn(
        r#"
echo "name=$(hostname) kernel=$(uname -r)"
echo "initiator=$(cat /etc/iscsi/initiatorname.iscsi)"
echo "greeting=$GREETING"
cat /xchg/from-host
mark booted
echo written > /xchg/from-guest
echo daemon-log > "$MAAS_RUN/extra.log"
echo to-stderr >&2
exit 7
"#,
    );
    running.wait_for_mark("booted", Duration::from_secs(120));
    let pid = running.pid().unwrap();
    let run = running.wait();
    assert_eq!(run.status, Some(7), "{run}");
    assert!(!run.success() && !run.timed_out);
    assert!(run.output.contains("name=harness kernel=6.12."), "{run}");
    assert!(
        run.output
            .contains(&format!("initiator=InitiatorName={}", g.initiator_name())),
        "{run}"
    );
    assert!(run.output.contains("greeting=it's \"quoted\""), "{run}");
    assert!(run.output.contains("host says hi"), "{run}");
    assert!(run.output.contains("to-stderr"), "{run}");
    assert_eq!(run.marks(), vec!["booted"]);
    assert!(run.console.contains("MAAS-GUEST-EXIT 7"), "{run}");
    assert_eq!(run.file("extra.log"), "daemon-log\n");
    assert_eq!(
        std::fs::read_to_string(xchg.path().join("from-guest")).unwrap(),
        "written\n"
    );
    assert!(!alive(pid), "QEMU {pid} outlived its guest");
}

#[test]
fn a_hung_guest_is_killed_at_its_timeout() {
    let g = Guest::new("hung").timeout(Duration::from_secs(20));
    let running = g.spawn("sleep 100000");
    let pid = running.pid().unwrap();
    let run = running.wait();
    assert!(run.timed_out && run.status.is_none(), "{run}");
    assert!(!alive(pid), "QEMU {pid} survived the timeout");
    // Dropping a running guest kills it too.
    let running = g.spawn("sleep 100000");
    let pid = running.pid().unwrap();
    drop(running);
    assert!(!alive(pid), "QEMU {pid} survived its drop");
}

#[test]
fn a_guest_that_crashes_in_its_script_is_reported_not_booted_again() {
    let xchg = tempfile::tempdir().unwrap();
    let run = Guest::new("crash")
        .exchange(xchg.path())
        .timeout(Duration::from_secs(180))
        .run("mark crashing\necho c > /proc/sysrq-trigger\nsleep 100000");
    assert!(run.status.is_none() && !run.timed_out, "{run}");
    assert!(run.console.contains("Kernel panic"), "{run}");
    assert_eq!(run.marks(), vec!["crashing"]);
    // Only boot failures are retried: this one ran its script, once.
    assert!(!run.died_before_the_script(), "{run}");
    let runs = std::fs::read_dir(xchg.path().join(".maas"))
        .unwrap()
        .count();
    assert_eq!(runs, 1, "the guest was booted {runs} times");
}
