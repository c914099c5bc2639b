//! The verdict functions of the shared group's cases that judge what the set-up or a
//! connect observed: each can FAIL.

use super::connect::{judge_guest_first, judge_host_first};
use super::device::judge_hotplug;
use super::state::FirstContact;
use crate::report::Verdict;
use crate::session::SessionError;
use std::time::Duration;

fn timeout() -> SessionError {
    SessionError::Timeout { port: "org.vport.conf.a".into(), what: "HELLO".into(), timeout: Duration::from_secs(90) }
}

#[test]
fn host_first_fails_when_the_guest_opened_but_never_saw_the_host() {
    let ok = FirstContact { hello: Ok((Duration::from_millis(4200), 5)), frontend_open: Some(true) };
    assert_eq!(judge_host_first(&ok).unwrap().verdict, Verdict::Pass);
    let unseen = FirstContact { hello: Err(timeout()), frontend_open: Some(true) };
    let o = judge_host_first(&unseen).unwrap();
    assert_eq!(o.verdict, Verdict::Fail);
    assert!(o.observed.contains("did not see the host client"), "{}", o.observed);
    let closed = FirstContact { hello: Ok((Duration::from_secs(4), 1)), frontend_open: Some(false) };
    assert_eq!(judge_host_first(&closed).unwrap().verdict, Verdict::Fail, "READY but QEMU shows it closed");
    let no_agent = FirstContact { hello: Err(timeout()), frontend_open: Some(false) };
    assert!(judge_host_first(&no_agent).is_err(), "the guest never opened the port: ERROR, not a verdict");
}

#[test]
fn guest_first_fails_without_an_open_or_without_a_session() {
    assert_eq!(judge_guest_first(Ok(()), Some(Ok(1))).verdict, Verdict::Pass);
    assert_eq!(judge_guest_first(Err("frontend-open stayed false".into()), None).verdict, Verdict::Fail);
    let o = judge_guest_first(Ok(()), Some(Err("no HELLO within 15s".into())));
    assert_eq!(o.verdict, Verdict::Fail);
    assert!(o.observed.contains("after connect no session"), "{}", o.observed);
}

#[test]
fn hotplug_fails_when_the_agent_does_not_take_the_port() {
    assert_eq!(judge_hotplug(Ok((Duration::from_millis(13), 1)), Some(true)).verdict, Verdict::Pass);
    assert_eq!(judge_hotplug(Err("no HELLO within 30s".into()), Some(true)).verdict, Verdict::Fail);
    assert_eq!(judge_hotplug(Ok((Duration::from_millis(13), 1)), Some(false)).verdict, Verdict::Fail);
    assert_eq!(judge_hotplug(Ok((Duration::from_millis(13), 1)), None).verdict, Verdict::Fail);
}
