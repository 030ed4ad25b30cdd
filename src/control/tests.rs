//! The wire's compatibility rules (doc/CONTROL.md, "Versions"): names stay
//! what they were, a newer peer's unknown names do not fail a reply, an
//! older daemon's replies still read, and defaulted request fields are not
//! sent.

use super::*;
use crate::engine::report::VolumeStateName;
use crate::engine::view::IoMode;
use crate::engine::{LifeState, OpName, Pending};
use crate::error::{Cause, ErrorClass};
use serde_json::{json, Value};

fn reply(v: Value) -> Reply {
    serde_json::from_value(v).expect("reads as a reply")
}

#[test]
fn an_error_keeps_its_kind_and_cause_across_the_socket() {
    let e = Error::because("appvms/w/private", Cause::TimedOut, "still running");
    let wire = serde_json::to_string(&Reply::error(WireError::from(&e))).unwrap();
    let back = match serde_json::from_str::<Reply>(&wire).unwrap().outcome {
        ReplyOutcome::Error(w) => Error::from(w),
        ReplyOutcome::Ok(r) => panic!("not an error: {r:?}"),
    };
    assert_eq!(back.class(), ErrorClass::Busy);
    assert_eq!(
        back.cause(),
        Some(Cause::TimedOut),
        "the CLI keeps the cause"
    );
    assert_eq!(back.to_string(), e.to_string());
    let v: Value = serde_json::from_str(&wire).unwrap();
    assert_eq!(v["error"]["kind"], "busy");
    assert_eq!(v["error"]["cause"], "timed-out");
}

#[test]
fn names_a_newer_daemon_adds_read_as_unknown() {
    let r = reply(
        json!({"protocol": "1.9", "error": {"kind": "frobbed", "code": 12,
        "message": "m", "cause": "a-new-cause"}}),
    );
    let ReplyOutcome::Error(w) = r.outcome else {
        panic!("not an error")
    };
    assert_eq!((w.kind, w.cause), (ErrorClass::Io, None));
    let r = reply(
        json!({"protocol": "1.9", "ok": {"result": "status", "data": {
        "pool": "/p", "mounted": true, "io_mode": "uring",
        "busy": [{"vid": "a/b/c", "state": "defragmenting"}]}}}),
    );
    let ReplyOutcome::Ok(resp) = r.outcome else {
        panic!("not ok")
    };
    let Response::Status(st) = *resp else {
        panic!("not a status")
    };
    assert_eq!(st.io_mode, Some(IoMode::Unknown));
    assert_eq!(st.busy[0].state, LifeState::Unknown);
    let o: StopReport = serde_json::from_value(json!({"kind": "teleported"})).unwrap();
    assert_eq!(o, StopReport::Unknown);
    let s: VolumeStateName = serde_json::from_value(json!("hibernating")).unwrap();
    assert_eq!(s, VolumeStateName::Unknown);
    // A queued change of a kind this build does not know: the reply reads,
    // with its prose, and no structured change.
    let change = json!({"action": "squash", "into": 3});
    let r = reply(
        json!({"protocol": "1.9", "ok": {"result": "status", "data": {
        "pool": "/p", "mounted": true,
        "pending": [{"vid": "a/b/c", "pending": "squash at stop", "change": change}]}}}),
    );
    let ReplyOutcome::Ok(resp) = r.outcome else {
        panic!("not ok")
    };
    let Response::Status(st) = *resp else {
        panic!("not a status")
    };
    assert_eq!(st.pending[0].pending, "squash at stop");
    assert_eq!(st.pending[0].change, None);
    let r = reply(
        json!({"protocol": "1.9", "ok": {"result": "queued", "data": {
        "vid": "a/b/c", "pending": "squash at stop", "change": change}}}),
    );
    let ReplyOutcome::Ok(resp) = r.outcome else {
        panic!("not ok")
    };
    assert!(matches!(*resp, Response::Queued { change: None, .. }));
    // One it knows still reads as itself.
    let r = reply(
        json!({"protocol": "1.5", "ok": {"result": "queued", "data": {
        "vid": "a/b/c", "pending": "p", "change": {"action": "discard"}}}}),
    );
    let ReplyOutcome::Ok(resp) = r.outcome else {
        panic!("not ok")
    };
    assert!(matches!(
        *resp,
        Response::Queued {
            change: Some(Pending::Discard),
            ..
        }
    ));
}

#[test]
fn replies_of_a_daemon_before_1_5_still_read() {
    let r = reply(
        json!({"protocol": "1.4", "ok": {"result": "detached", "data": {
        "vid": "a/b/c", "device": "/dev/loop0", "stop": "discarded"}}}),
    );
    let ReplyOutcome::Ok(resp) = r.outcome else {
        panic!("not ok")
    };
    assert!(matches!(
        *resp,
        Response::Detached {
            outcome: None,
            stop: Some(_),
            ..
        }
    ));
    let r = reply(
        json!({"protocol": "1.4", "ok": {"result": "queued", "data": {
        "vid": "a/b/c", "pending": "discard the running changes at stop"}}}),
    );
    let ReplyOutcome::Ok(resp) = r.outcome else {
        panic!("not ok")
    };
    assert!(matches!(*resp, Response::Queued { change: None, .. }));
}

/// The wire names of every variant of a unit enum, and its Display.
fn same_names<T: serde::Serialize + std::fmt::Display>(all: &[T]) {
    for x in all {
        assert_eq!(serde_json::to_value(x).unwrap(), json!(x.to_string()));
    }
}

#[test]
fn states_show_as_they_are_sent() {
    let lives: Vec<LifeState> = LifeState::all().collect();
    same_names(&lives);
    assert_eq!(lives.len(), 13, "6 phases and 7 operations");
    let names: Vec<VolumeStateName> = VolumeStateName::all().collect();
    same_names(&names);
    assert_eq!(names.len(), 15, "8 states and 7 operations");
    for l in lives {
        assert_eq!(
            serde_json::from_value::<LifeState>(json!(l.as_str())).unwrap(),
            l
        );
    }
    for n in names {
        let back: VolumeStateName = serde_json::from_value(json!(n.as_str())).unwrap();
        assert_eq!(back, n);
    }
    assert_eq!(
        LifeState::Busy(OpName::RemoveRevision).to_string(),
        "removing a revision"
    );
    same_names(&[IoMode::Passthrough, IoMode::Daemon]);
}

#[test]
fn defaulted_request_fields_are_not_sent() {
    let vid = || "w:private".to_owned();
    let sent = |r: Request| {
        let v = serde_json::to_value(&r).unwrap();
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        // And it reads back as the same request.
        assert_eq!(serde_json::from_value::<Request>(v).unwrap(), r);
        keys.join(",")
    };
    let cases = [
        (
            Request::VolumeCreate {
                vid: vid(),
                size: 1,
                snapshot_of: None,
                volatile: false,
                revisions_to_keep: None,
                read_only: false,
                optional: false,
                with_data: false,
            },
            "op,size,vid",
        ),
        (
            Request::VolumeAttach {
                vid: vid(),
                read_only: false,
                direct_io: None,
                block_size: None,
            },
            "op,vid",
        ),
        (
            Request::VolumeDetach {
                vid: vid(),
                force: false,
                timeout_ms: None,
            },
            "op,vid",
        ),
        (
            Request::VolumeExport {
                vid: vid(),
                revision: None,
                dest: String::new(),
            },
            "op,vid",
        ),
        (
            Request::VolumeInfo {
                vid: vid(),
                brief: false,
            },
            "op,vid",
        ),
        (Request::PoolCheck { volume: None }, "op"),
    ];
    for (request, keys) in cases {
        let shown = format!("{request:?}");
        assert_eq!(sent(request), keys, "{shown}");
    }
}
