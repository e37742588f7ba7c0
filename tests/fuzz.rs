//! The fuzz targets of `fuzz/` on the stable toolchain: each runs a bounded number of proptest
//! cases of hostile and near-valid input (2,000 by default, as `./scripts/test` runs it;
//! `BERTH_FUZZ_CASES=20000` for the long run), and replays its seed corpus. No target may
//! panic. cargo-fuzz (nightly) runs the same bodies open-ended.

#[path = "../fuzz/targets.rs"]
mod targets;

use proptest::prelude::*;
use proptest::test_runner::Config;

fn config() -> Config {
    let cases = std::env::var("BERTH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    Config {
        cases,
        // Shrinking a failure is useful; unbounded shrinking is not.
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..Config::default()
    }
}

/// Arbitrary bytes, or text made of `alphabet` so parsers get past their first check.
fn input(pattern: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        any::<String>().prop_map(String::into_bytes),
        pattern.prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn api_paths_never_panic(data in input(
        "([a-z0-9._/-]|\\.\\.|%00|%2e|%ff){0,60}/(manifests|blobs|tags|referrers)/([a-zA-Z0-9:._-]|sha256:|%2f|/){0,80}"
    )) {
        targets::api_path(&data);
    }

    #[test]
    fn references_never_panic(data in input(
        "(//image/|/org/[a-z]{1,5}/image/)?([a-z0-9.:_-]{0,12}/){0,4}[a-zA-Z0-9._-]{0,20}(:[a-zA-Z0-9._-]{0,20})?(@sha256:[0-9a-f]{0,64})?"
    )) {
        targets::reference(&data);
    }

    #[test]
    fn digests_never_panic(data in input("(sha256|sha512|SHA256|[a-z0-9+._-]{0,10}):[0-9a-fA-F]{0,130}")) {
        targets::digest(&data);
    }

    #[test]
    fn registry_hosts_never_panic(data in input(
        "([A-Za-z0-9*%@/?#\\[\\]:. _-]{0,20})(\\.gcr\\.io|-docker\\.pkg\\.dev)?(:[0-9]{0,6})?"
    )) {
        targets::registry_host(&data);
    }

    #[test]
    fn ranges_never_panic(size in any::<u64>(), header in input(
        "(bytes|BYTES|items)? ?= ?-?[0-9]{0,21}(-[0-9]{0,21})?(, ?[0-9]{0,5}-[0-9]{0,5}){0,3}"
    )) {
        let mut data = size.to_le_bytes().to_vec();
        data.extend_from_slice(&header);
        targets::range(&data);
    }

    #[test]
    fn www_authenticate_never_panics(data in input(
        "((Bearer|Basic|bearer|Digest) ?(([a-z]{1,8}) ?= ?(\"([^\"\\\\]|\\\\.){0,20}\"?|[a-zA-Z0-9:/._-]{0,20}) ?,? ?){0,5}){0,3}"
    )) {
        targets::www_authenticate(&data);
    }

    #[test]
    fn manifests_never_panic(data in prop_oneof![
        input(
            "\\{\"(schemaVersion|mediaType|layers|manifests)\":(\"[a-z./+]{0,30}\"|[0-9]{1,3}|\\[|\\{|null)(,\"mediaType\":\"[a-z./+]{0,40}\")?\\}?"
        ),
        input(
            "\\{(\"(config|subject)\":\\{\"digest\":\"sha256:[0-9a-f]{64}\"(,\"size\":[0-9]{1,3})?(,\"urls\":(\\[\"x\"\\]|null))?\\},?|\"(layers|blobs|manifests)\":\\[(\\{\"digest\":\"(sha256:[0-9a-f]{64}|[a-z:0-9]{0,10})\"(,\"size\":[0-9]{1,3})?(,\"urls\":(\\[\\]|null|7))?(,\"platform\":\\{\"os\":\"linux\",\"architecture\":\"[a-z0-9]{0,5}\"\\})?\\},?){0,3}\\],?|\"mediaType\":\"application/vnd\\.(oci\\.image\\.(index|manifest)\\.v1|oci\\.artifact\\.manifest\\.v1|docker\\.distribution\\.manifest\\.(v2|list\\.v2))\\+json\",?){0,5}\\}?"
        ),
    ]) {
        targets::manifest(&data);
    }

    #[test]
    fn origin_sidecars_never_panic(data in input(
        "berth-origin 1\n((from|held) [a-z.:0-9]{0,12}( [a-z/]{0,10})?\n){0,4}(sum [0-9a-f]{0,64}\n)?"
    )) {
        targets::origin(&data);
    }

    #[test]
    fn policy_json_never_panics(data in input(
        "\\{\"(name|targetKind|target|targetLinks|targetQuery|bindings|kind|items|serviceAccounts|users|groups)\":(\"[a-z/:@.]{0,20}\"|\\[|\\{|null|[0-9]{1,3})(,\"(op|property|value|permissions|principalLinks|match|terms)\":(\"[a-z=<>!/]{0,12}\"|\\[\\]|\\{))?\\}?"
    )) {
        targets::policy_json(&data);
    }

    #[test]
    fn secret_json_never_panics(data in input(
        "\\{\"(auths|accessKey|secretKey|roleArn|externalId|type|private_key|project_id|client_email|token_uri)\":(\"[a-zA-Z0-9:/=+._@-]{0,30}\"|\\{\"[a-z.:]{0,15}\":\\{\"(auth|username|password)\":\"[a-zA-Z0-9=+/]{0,20}\"\\}\\}|null|7)\\}"
    )) {
        targets::secret_json(&data);
    }

    #[test]
    fn accept_headers_never_panic(data in input(
        "((application/vnd\\.(oci\\.image\\.(index|manifest)\\.v1|docker\\.distribution\\.manifest\\.(v2|list\\.v2|v1))\\+json|\\*/\\*|application/\\*|[a-zA-Z/+.*]{0,12})(;[ ]?q=[0-9.]{0,4})?[ ,]{0,2}){0,6}"
    )) {
        targets::accept(&data);
    }
}

#[test]
fn every_seed_corpus_replays_cleanly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in targets::TARGETS {
        let dir = root.join(name);
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            target(&bytes);
            seeds += 1;
        }
        assert!(seeds > 0, "{name} has a seed corpus");
    }
}
