//! The Nix packaging, evaluated for real: Debian's `nix-instantiate` with
//! nixpkgs' own `lib` (../shared/vendor/nixpkgs-lib, or KVRAFT_NIXPKGS_LIB)
//! evaluates `flake.nix`, `nix/package.nix` and `nix/module.nix`, with
//! stand-ins only for the parts of nixpkgs and NixOS that can't be fetched
//! here (tests/nix/eval-*.nix). Every configuration file the module renders
//! is read by the real kvraftd, and so is every bad one the module refuses.
//!
//! A missing nix-instantiate or lib fails these tests (`scripts/test.sh`
//! installs nix-bin), unless KVRAFT_SKIP_NIX=1 asks to skip them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const KVRAFTD: &str = env!("CARGO_BIN_EXE_kvraftd");
/// Where the unit's credentials directory (%d) is.
const CREDENTIALS: &str = "/run/credentials/kvraft.service";

/// nixpkgs' lib directory; None (with the reason printed) only when the
/// skip was asked for.
fn nixpkgs_lib() -> Option<PathBuf> {
    // The vendored lib sits next to the checkout (../shared/vendor).
    let lib = std::env::var_os("KVRAFT_NIXPKGS_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join("../shared/vendor/nixpkgs-lib/lib"));
    let nix = Command::new("nix-instantiate").arg("--version").output();
    let problem = match nix {
        Err(e) => Some(format!("nix-instantiate: {e} (Debian: apt-get install nix-bin)")),
        Ok(_) if !lib.join("default.nix").exists() => {
            Some(format!("no nixpkgs lib at {} (set KVRAFT_NIXPKGS_LIB)", lib.display()))
        }
        Ok(_) => None,
    };
    match problem {
        None => Some(lib),
        Some(problem) if std::env::var("KVRAFT_SKIP_NIX").is_ok_and(|v| v == "1") => {
            eprintln!("SKIPPED (KVRAFT_SKIP_NIX=1): {problem}");
            None
        }
        Some(problem) => panic!("{problem}; scripts/test.sh installs it, or set KVRAFT_SKIP_NIX=1 to skip on purpose"),
    }
}

/// Runs a nix command, one at a time: concurrent nix processes on a store
/// that was just installed fail with "SQLite database ... is busy" while the
/// first one creates its database, which reads as the evaluation failing.
fn run_nix(command: &mut Command) -> std::process::Output {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    command.output().expect("nix-instantiate runs")
}

/// `nix-instantiate --eval --strict --json` of a file under tests/nix.
fn nix_eval(lib: &Path, file: &str, args: &[(&str, &str)]) -> Result<Value, String> {
    let mut command = Command::new("nix-instantiate");
    // Nix 2.8 reads a builtins.toFile result only in read-write mode.
    command
        .args(["--eval", "--strict", "--json", "--read-write-mode"])
        .arg(Path::new(ROOT).join("tests/nix").join(file))
        .args(["--arg", "lib"])
        .arg(format!("import {}", lib.display()));
    for (name, value) in args {
        command.args(["--argstr", name, value]);
    }
    let out = run_nix(&mut command);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("nix-instantiate --json prints JSON"))
}

fn eval_case(lib: &Path, group: &str, case: &str) -> Value {
    nix_eval(lib, "eval-module.nix", &[("group", group), ("case", case)])
        .unwrap_or_else(|e| panic!("{group} case {case} does not evaluate: {e}"))
}

fn case_names(group: &str) -> Vec<String> {
    let out = run_nix(
        Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json", "-E"])
            .arg(format!(
                "builtins.attrNames (import {ROOT}/tests/nix/module-cases.nix).{group}"
            )),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let names: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(names.len() >= 5, "{group}: {names:?}");
    names
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The unit's Environment= as kvraftd will see it.
fn unit_environment(case: &Value) -> Vec<(String, String)> {
    strings(&case["environment"])
        .iter()
        .map(|entry| {
            let (name, value) = entry.split_once('=').unwrap();
            (name.to_string(), value.replace("%d", CREDENTIALS))
        })
        .collect()
}

/// `kvraftd --print-config --config FILE` with only the unit's environment.
fn print_config(file: &Path, environment: &[(String, String)]) -> Output {
    Command::new(KVRAFTD)
        .env_clear()
        .envs(environment.iter().map(|(k, v)| (k, v)))
        .args(["--print-config", "--config"])
        .arg(file)
        .output()
        .unwrap()
}

/// Runs the module's build step (checkConfig) as the build would, with the
/// real kvraftd in place of the stand-in package; returns its output and the
/// file it produced.
fn run_check_script(case: &Value, dir: &Path) -> (Output, PathBuf) {
    let package = dir.join("package");
    std::fs::create_dir_all(package.join("bin")).unwrap();
    let _ = std::os::unix::fs::symlink(KVRAFTD, package.join("bin/kvraftd"));
    let script = case["checkScript"]
        .as_str()
        .expect("checkConfig is on: the file is built by a check step")
        .replace(case["standInPackage"].as_str().unwrap(), package.to_str().unwrap());
    let out = dir.join("kvraft.toml");
    let output = Command::new("bash")
        .args(["-euc", &script])
        .env("out", &out)
        .output()
        .unwrap();
    (output, out)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn good_module_settings_render_files_that_kvraftd_reads_back_key_by_key() {
    let Some(lib) = nixpkgs_lib() else { return };
    for name in case_names("good") {
        let case = eval_case(&lib, "good", &name);
        assert_eq!(strings(&case["failedAssertions"]), Vec::<String>::new(), "{name}");
        let dir = tempfile::tempdir().unwrap();
        let rendered_path = dir.path().join("rendered.toml");
        let rendered_text = case["configText"].as_str().unwrap();
        std::fs::write(&rendered_path, rendered_text).unwrap();
        let rendered: toml::Table = rendered_text.parse().unwrap();

        // The build step, where checkConfig is on, passes and installs the
        // rendered file unchanged.
        if name == "joining" {
            assert!(case["checkScript"].is_null(), "{name}: checkConfig = false");
        } else {
            let (out, built) = run_check_script(&case, dir.path());
            assert!(out.status.success(), "{name}: the check step failed: {}", stderr(&out));
            assert_eq!(std::fs::read_to_string(built).unwrap(), rendered_text, "{name}");
        }

        // kvraftd, with the unit's environment, accepts the file and reads
        // every key as rendered.
        let environment = unit_environment(&case);
        let out = print_config(&rendered_path, &environment);
        assert!(
            out.status.success(),
            "{name}: kvraftd refused:\n{}\n{rendered_text}",
            stderr(&out)
        );
        let effective: toml::Table = String::from_utf8(out.stdout).unwrap().parse().unwrap();
        for (key, value) in &rendered {
            assert_eq!(effective.get(key), Some(value), "{name}: key {key}");
        }
        // The TLS files come from the credentials directory, one per key.
        let credentials = strings(&case["loadCredential"]);
        assert_eq!(credentials.len(), environment.len(), "{name}");
        for (variable, path) in &environment {
            let key = variable.strip_prefix("KVRAFT_").unwrap().to_lowercase();
            assert!(
                key.ends_with("_file"),
                "{name}: only the TLS files come from the environment: {variable}"
            );
            assert_eq!(
                effective.get(&key).and_then(|v| v.as_str()),
                Some(path.as_str()),
                "{name}: {key}"
            );
            let file = path.strip_prefix(&format!("{CREDENTIALS}/")).unwrap();
            assert!(
                credentials.iter().any(|c| c.starts_with(&format!("{file}:/"))),
                "{name}: {credentials:?}"
            );
        }

        // The unit: one source for the data dir, no restart on a
        // configuration error, a start limit that a crash loop reaches.
        let service = &case["serviceConfig"];
        let data_dir = rendered["data_dir"].as_str().unwrap();
        assert_eq!(
            service["StateDirectory"].as_str(),
            data_dir.strip_prefix("/var/lib/"),
            "{name}"
        );
        assert_eq!(service["RestartPreventExitStatus"], 78, "{name}");
        assert_eq!(service["Restart"], "on-failure", "{name}");
        assert_eq!(case["startLimit"]["startLimitBurst"], 5, "{name}");
        assert_eq!(case["startLimit"]["startLimitIntervalSec"], 120, "{name}");
        assert_eq!(
            service["ExecStart"].as_str().unwrap(),
            format!(
                "{}/bin/kvraftd --config /etc/kvraft/kvraft.toml",
                case["standInPackage"].as_str().unwrap()
            ),
            "{name}"
        );

        // The firewall: per interface when asked, and a warning when the peer
        // port faces every network without TLS.
        let firewall = &case["firewall"];
        let ports = |v: &Value| -> Vec<u64> { v.as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect() };
        let warnings = strings(&case["warnings"]);
        match name.as_str() {
            "static-cluster" => {
                assert_eq!(ports(&firewall["allowedTCPPorts"]), Vec::<u64>::new());
                assert_eq!(
                    ports(&firewall["interfaces"]["eth1"]["allowedTCPPorts"]),
                    [7379, 7380, 9379]
                );
                assert_eq!(warnings, Vec::<String>::new());
            }
            "tls" => {
                assert_eq!(ports(&firewall["allowedTCPPorts"]), [7379, 7380, 9379]);
                assert_eq!(warnings, Vec::<String>::new(), "peer TLS is on");
            }
            "open-firewall-everywhere" => {
                assert_eq!(ports(&firewall["allowedTCPPorts"]), [7379, 7380, 9379]);
                assert!(
                    warnings.len() == 1
                        && warnings[0].contains("peer port 7380 on every interface and peer TLS is off"),
                    "{warnings:?}"
                );
            }
            _ => {
                assert_eq!(ports(&firewall["allowedTCPPorts"]), Vec::<u64>::new(), "{name}");
                assert_eq!(firewall["interfaces"], serde_json::json!({}), "{name}");
                assert_eq!(warnings, Vec::<String>::new(), "{name}");
            }
        }
    }
}

#[test]
fn bad_module_settings_fail_evaluation_where_kvraftd_would_fail_to_start() {
    let Some(lib) = nixpkgs_lib() else { return };
    let mut module_only = Vec::new();
    for name in case_names("bad") {
        let case = eval_case(&lib, "bad", &name);
        let message = case["message"].as_str().unwrap();
        let failed = strings(&case["failedAssertions"]);
        assert!(
            failed.iter().any(|m| m.contains(message)),
            "{name}: expected a failed assertion containing {message:?}, got {failed:?}"
        );

        // The same file and environment, given to kvraftd: it refuses them
        // with exit 78 and the same reason, and so does the build step that
        // checks the file.
        let dir = tempfile::tempdir().unwrap();
        let rendered = dir.path().join("rendered.toml");
        std::fs::write(&rendered, case["configText"].as_str().unwrap()).unwrap();
        let out = print_config(&rendered, &unit_environment(&case));
        let (check, _) = run_check_script(&case, dir.path());
        match case["daemonSays"].as_str() {
            Some(says) => {
                assert_eq!(out.status.code(), Some(78), "{name}: {}", stderr(&out));
                assert!(stderr(&out).contains(says), "{name}: {}", stderr(&out));
                assert!(!check.status.success(), "{name}: the check step passed");
                assert!(
                    stderr(&check).contains(says) && stderr(&check).contains("kvraftd refuses the configuration"),
                    "{name}: {}",
                    stderr(&check)
                );
            }
            None => {
                // Refused by the module alone (kvraftd would run, but not as
                // meant): say so, so that the list stays short and deliberate.
                assert!(out.status.success(), "{name}: {}", stderr(&out));
                module_only.push(name);
            }
        }
    }
    assert_eq!(module_only, ["data-dir-in-settings", "data-dir-outside-var-lib"]);
}

#[test]
fn the_module_without_the_flake_builds_the_package_from_the_checkout() {
    let Some(lib) = nixpkgs_lib() else { return };
    let with_overlay = eval_case(&lib, "good", "defaults");
    let alone = nix_eval(
        &lib,
        "eval-module.nix",
        &[("group", "good"), ("case", "defaults"), ("package", "checkout")],
    )
    .unwrap_or_else(|e| panic!("nix/module.nix imported alone: {e}"));
    assert!(
        with_overlay["standInPackage"]
            .as_str()
            .unwrap()
            .ends_with("-kvraft-stand-in"),
        "pkgs.kvraft when the overlay provides it"
    );
    let package = alone["standInPackage"].as_str().unwrap();
    let built = format!("-kvraft-{}", env!("CARGO_PKG_VERSION"));
    assert!(package.ends_with(&built), "nix/package.nix otherwise: {package}");
    assert_eq!(
        alone["serviceConfig"]["ExecStart"].as_str().unwrap(),
        format!("{package}/bin/kvraftd --config /etc/kvraft/kvraft.toml")
    );
}

#[test]
fn the_flake_offers_the_cli_the_server_and_checks_that_need_no_kvm() {
    let Some(lib) = nixpkgs_lib() else { return };
    let flake = nix_eval(&lib, "eval-flake.nix", &[]).unwrap_or_else(|e| panic!("flake.nix: {e}"));
    let package = &flake["package"];
    let out = package["out"].as_str().unwrap();
    for (app, program) in [("kvraft", "kvraft"), ("kvraftd", "kvraftd"), ("default", "kvraftd")] {
        assert_eq!(flake["apps"][app]["type"], "app");
        assert_eq!(
            flake["apps"][app]["program"].as_str().unwrap(),
            format!("{out}/bin/{program}"),
            "apps.{app}"
        );
    }
    assert_eq!(
        strings(&flake["checks"]),
        ["module", "package"],
        "nothing in checks needs KVM"
    );
    assert_eq!(strings(&flake["legacyPackages"]), ["vm-test"]);
    assert_eq!(strings(&flake["systems"]), ["aarch64-linux", "x86_64-linux"]);
    assert_eq!(strings(&flake["packages"]), ["default", "kvraft"]);
    assert_eq!(flake["hasOverlay"], true);
    assert_eq!(flake["hasModule"], true);
    assert_eq!(flake["hasFormatter"], "nixfmt-tree");
    assert_eq!(package["doCheck"], true, "the unit tests run in the build");
    assert_eq!(strings(&package["cargoTestFlags"]), ["--lib", "--bins"]);
    assert_eq!(package["mainProgram"], "kvraft");
    assert_eq!(package["lockFile"].as_str().unwrap(), format!("{ROOT}/Cargo.lock"));

    // The input and the lock agree, on a release that is still supported.
    let url = flake["inputUrl"].as_str().unwrap();
    let branch = url.strip_prefix("github:NixOS/nixpkgs/").expect(url);
    let lock: Value = serde_json::from_str(&std::fs::read_to_string(format!("{ROOT}/flake.lock")).unwrap()).unwrap();
    let root_inputs = &lock["nodes"][lock["root"].as_str().unwrap()]["inputs"];
    let node = &lock["nodes"][root_inputs["nixpkgs"].as_str().unwrap()];
    assert_eq!(
        node["original"]["ref"], branch,
        "flake.lock was locked for another branch"
    );
    assert_eq!(node["original"]["owner"], "NixOS");
    assert_eq!(node["locked"]["type"], "github");
    let release = branch.strip_prefix("nixos-").expect(branch);
    assert!(release >= "26.05", "{branch}: nixos-26.05 or newer");
    let rev = node["locked"]["rev"].as_str().unwrap();
    assert!(rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()), "{rev}");
    let nar_hash = node["locked"]["narHash"].as_str().unwrap();
    assert!(
        nar_hash.starts_with("sha256-") && nar_hash.len() == 51 && nar_hash.ends_with('='),
        "{nar_hash}"
    );
    assert!(
        node["locked"]["lastModified"].as_u64().unwrap() > 1_780_000_000,
        "locked after 26.05 was branched"
    );
}

#[test]
fn the_flakes_module_check_builds_every_good_case_and_rejects_a_wrong_expectation() {
    let Some(lib) = nixpkgs_lib() else { return };
    // checks.module, with a stand-in for lib.nixosSystem: every good case
    // evaluates as a system and its configuration file is an input.
    let flake = nix_eval(&lib, "eval-flake.nix", &[]).unwrap_or_else(|e| panic!("flake.nix: {e}"));
    let build = flake["moduleCheck"].as_str().unwrap();
    for name in case_names("good") {
        assert!(
            build.contains(&format!("-kvraft.toml $out/{name}.toml\n")),
            "{name}: {build}"
        );
    }
    // A bad case whose expected message no assertion has fails the check.
    let err = nix_eval(&lib, "eval-flake.nix", &[("mutate", "wrong-message")]).unwrap_err();
    assert!(
        err.contains(
            "bad case join-and-initial-cluster: expected a failed assertion containing \"a message no assertion has\""
        ),
        "{err}"
    );
}

#[test]
fn an_older_rustc_than_the_lock_needs_is_refused_by_name() {
    let Some(lib) = nixpkgs_lib() else { return };
    let err = nix_eval(&lib, "eval-flake.nix", &[("rustcVersion", "1.87.0")]).unwrap_err();
    assert!(
        err.contains("kvraft needs Rust 1.88 or newer") && err.contains("this nixpkgs has 1.87.0"),
        "{err}"
    );
}

#[test]
fn the_nix_source_set_is_what_cargo_reads_and_rust_version_is_the_locks() {
    let Some(lib) = nixpkgs_lib() else { return };
    let flake = nix_eval(&lib, "eval-flake.nix", &[]).unwrap_or_else(|e| panic!("flake.nix: {e}"));
    let root = Path::new(ROOT);
    let listed: BTreeSet<String> = strings(&flake["sourceFiles"])
        .iter()
        .map(|p| Path::new(p).strip_prefix(root).unwrap().display().to_string())
        .collect();

    // Exactly Cargo.toml, Cargo.lock, build.rs, benches/, proto/ and src/.
    let mut expected: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "build.rs"].map(String::from).into();
    for dir in ["src", "proto", "benches"] {
        walk(&root.join(dir), &mut |path| {
            expected.insert(path.strip_prefix(root).unwrap().display().to_string());
        });
    }
    assert_eq!(listed, expected);

    // The store copy that the build uses holds the same files.
    let store = PathBuf::from(flake["package"]["src"].as_str().unwrap());
    let mut copied = BTreeSet::new();
    walk(&store, &mut |path| {
        copied.insert(path.strip_prefix(&store).unwrap().display().to_string());
    });
    assert_eq!(copied, expected);

    // Every target but the integration tests builds from the set.
    let metadata = cargo_metadata();
    let ours = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "kvraft" && p["source"].is_null())
        .unwrap();
    for target in ours["targets"].as_array().unwrap() {
        let kind = strings(&target["kind"]);
        if kind.iter().any(|k| k == "test") {
            continue;
        }
        let src = Path::new(target["src_path"].as_str().unwrap())
            .strip_prefix(root)
            .unwrap();
        assert!(
            listed.contains(&src.display().to_string()),
            "{kind:?} {}",
            src.display()
        );
    }

    // rust-version is the highest any locked dependency declares.
    let ours_version = ours["rust_version"].as_str().unwrap();
    let (needed, by) = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["source"].is_null())
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].as_str().unwrap())))
        .max()
        .unwrap();
    assert_eq!(
        version(ours_version),
        needed,
        "Cargo.toml says {ours_version}; {by} needs {needed:?}"
    );
}

fn cargo_metadata() -> Value {
    // Not --offline: metadata resolves every platform's dependencies, and a
    // fresh machine has downloaded only this one's.
    let out = Command::new(env!("CARGO"))
        .current_dir(ROOT)
        .args(["metadata", "--locked", "--format-version", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// "1.88" and "1.88.0" compare equal.
fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|p| p.parse::<u64>().unwrap());
    (
        parts.next().unwrap(),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

fn walk(dir: &Path, found: &mut dyn FnMut(&Path)) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, found);
        } else {
            found(&path);
        }
    }
}
