//! `hardening.rs` and `delete.rs` plant damage through `qsnap_engine::testing`, so they exist
//! only in a build with the `testing` feature (`failpoints` turns it on; `scripts/test.sh`
//! passes it). Built without it (`cargo test -p qsnap-engine` alone), this test says so loudly
//! — and fails under CI — instead of the suite passing with those tests missing.

#[cfg(not(feature = "testing"))]
#[test]
fn hardening_and_delete_tests_need_the_testing_feature() {
    assert!(
        !qsnap_testkit::under_ci(),
        "hardening.rs and delete.rs need --features qsnap-engine/failpoints (scripts/test.sh passes it)"
    );
    eprintln!(
        "\n*** SKIPPED hardening.rs and delete.rs: built without --features qsnap-engine/failpoints ***\n"
    );
}
