//! The crypto as pure functions, then the key file and rotation against a SQLite store on a
//! temp directory.

use std::os::unix::fs::PermissionsExt;

use super::*;

fn key(byte: u8) -> MasterKey {
    MasterKey::from_bytes([byte; KEY_LEN])
}

fn value(text: &str) -> Secret {
    Secret::new(text)
}

#[test]
fn a_value_round_trips_under_its_key_org_and_name() {
    let k = key(1);
    for text in [
        "sk-live-123",
        "ü multi\nline\u{0}value",
        &"x".repeat(MAX_SECRET_BYTES),
    ] {
        let sealed = k.seal("alice", "API_KEY", &value(text)).unwrap();
        assert_eq!(sealed.key_id, k.id());
        assert_eq!(sealed.nonce.len(), NONCE_LEN);
        // The ciphertext holds no plaintext: it is the value's length plus a 16-byte tag.
        assert_eq!(sealed.ciphertext.len(), text.len() + 16);
        if text.len() > 4 {
            assert!(
                !sealed
                    .ciphertext
                    .windows(4)
                    .any(|w| w == &text.as_bytes()[..4])
            );
        }
        assert_eq!(k.open("alice", "API_KEY", &sealed).unwrap().expose(), text);
    }
}

#[test]
fn every_seal_has_a_fresh_nonce() {
    let k = key(1);
    let a = k.seal("o", "N", &value("same")).unwrap();
    let b = k.seal("o", "N", &value("same")).unwrap();
    assert_ne!(a.nonce, b.nonce);
    assert_ne!(a.ciphertext, b.ciphertext);
}

#[test]
fn another_key_does_not_decrypt() {
    let sealed = key(1).seal("alice", "API_KEY", &value("v")).unwrap();
    let other = key(2);
    assert_ne!(other.id(), key(1).id());
    let e = other.open("alice", "API_KEY", &sealed).unwrap_err();
    assert!(matches!(e, SecretError::Undecryptable { .. }), "{e}");
    assert_eq!(e.code(), ErrorCode::Internal);
    // Even under the right id, a wrong key is refused by the cipher itself.
    let mut relabelled = sealed.clone();
    relabelled.key_id = other.id().to_owned();
    assert!(other.open("alice", "API_KEY", &relabelled).is_err());
}

#[test]
fn a_ciphertext_moved_to_another_row_does_not_decrypt() {
    let k = key(1);
    let sealed = k.seal("alice", "API_KEY", &value("v")).unwrap();
    for (org, name) in [("bob", "API_KEY"), ("alice", "OTHER"), ("aliceAPI", "_KEY")] {
        assert!(k.open(org, name, &sealed).is_err(), "{org}/{name}");
    }
}

#[test]
fn a_tampered_byte_does_not_decrypt() {
    let k = key(1);
    let sealed = k.seal("alice", "API_KEY", &value("some value")).unwrap();
    for i in 0..sealed.ciphertext.len() {
        let mut bad = sealed.clone();
        bad.ciphertext[i] ^= 0x01;
        assert!(k.open("alice", "API_KEY", &bad).is_err(), "byte {i}");
    }
    for i in 0..sealed.nonce.len() {
        let mut bad = sealed.clone();
        bad.nonce[i] ^= 0x80;
        assert!(k.open("alice", "API_KEY", &bad).is_err(), "nonce byte {i}");
    }
    let mut short = sealed.clone();
    short.nonce.pop();
    assert!(k.open("alice", "API_KEY", &short).is_err());
    let mut cut = sealed;
    cut.ciphertext.pop();
    assert!(k.open("alice", "API_KEY", &cut).is_err());
}

#[test]
fn values_and_keys_never_print() {
    let v = value("hunter2-secret");
    assert_eq!(format!("{v}"), "[redacted]");
    assert!(!format!("{v:?}").contains("hunter2"));
    let k = key(0xab);
    let shown = format!("{k:?}");
    assert!(shown.contains(k.id()));
    assert!(!shown.contains("171"), "{shown}");
    let env = EnvSecrets::from_vars([("HEARTH_SECRET_TOKEN".into(), "hunter2-secret".into())]);
    assert!(!format!("{env:?}").contains("hunter2"));
    let sealed = k.seal("o", "N", &v).unwrap();
    let e = key(1).open("o", "N", &sealed).unwrap_err();
    assert!(!e.to_string().contains("hunter2"));
}

#[test]
fn names_are_environment_variable_names() {
    for ok in [
        "A",
        "OPENAI_API_KEY",
        "X1",
        "A_",
        &format!("A{}", "B".repeat(63)),
    ] {
        assert!(check_name(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "a",
        "1A",
        "_A",
        "A-B",
        "A B",
        "Aé",
        "lower",
        &format!("A{}", "B".repeat(64)),
    ] {
        let e = check_name(bad).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidName, "{bad}");
        assert!(e.to_string().contains("starting with a letter"), "{e}");
    }
    assert_eq!(
        check_value("N", &value("")).unwrap_err().to_string(),
        "the value of secret \"N\" is empty: a secret needs at least one byte"
    );
    let big = value(&"x".repeat(MAX_SECRET_BYTES + 1));
    assert_eq!(
        check_value("N", &big).unwrap_err().to_string(),
        "the value of secret \"N\" is 65537 bytes: at most 65536 (64 KiB)"
    );
}

#[test]
fn the_environment_gives_hearth_secret_variables_by_name() {
    let env = EnvSecrets::from_vars([
        ("HEARTH_SECRET_OPENAI".to_owned(), "sk-env".to_owned()),
        ("HEARTH_SECRET_bad".to_owned(), "x".to_owned()),
        ("HEARTH_SECRETS_MASTER_KEY_PATH".to_owned(), "/k".to_owned()),
        ("OTHER".to_owned(), "y".to_owned()),
    ]);
    assert_eq!(env.get("OPENAI").map(Secret::expose), Some("sk-env"));
    assert!(env.get("bad").is_none());
    assert!(env.get("S_MASTER_KEY_PATH").is_none());
    assert!(env.get("OTHER").is_none());
}

struct Fixture {
    dir: tempfile::TempDir,
    store: Store,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("db").display()))
            .await
            .unwrap();
        store.ensure_org("default").await.unwrap();
        store.ensure_org("alice").await.unwrap();
        Fixture { dir, store }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("secrets/master.key")
    }

    fn secrets(&self) -> Secrets {
        Secrets::new(self.store.clone(), self.path())
    }

    /// A hearthd start: the error's message when it refuses.
    async fn start(&self) -> Result<Secrets, String> {
        let s = self.secrets();
        s.open().await.map_err(|e| e.to_string())?;
        Ok(s)
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn the_first_start_makes_a_private_key_file_and_later_starts_read_it() {
    let f = Fixture::new().await;
    let s = f.start().await.unwrap();
    let path = f.path();
    assert_eq!(std::fs::read(&path).unwrap().len(), KEY_LEN);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    // Nothing left beside it.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["master.key"]);
    s.set("alice", "TOKEN", &value("v1"), "alice")
        .await
        .unwrap();
    let again = f.start().await.unwrap();
    assert_eq!(
        again
            .resolve("alice", "TOKEN")
            .await
            .unwrap()
            .unwrap()
            .expose(),
        "v1"
    );
}

#[tokio::test]
async fn a_bad_key_file_stops_the_start_naming_the_path_and_the_rule() {
    let f = Fixture::new().await;
    let s = f.start().await.unwrap();
    s.set("alice", "TOKEN", &value("v1"), "alice")
        .await
        .unwrap();
    let path = f.path();
    let shown = path.display().to_string();
    let good = std::fs::read(&path).unwrap();

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = f.start().await.unwrap_err();
    assert_eq!(
        e,
        format!(
            "master key file {shown} has mode 0640: group and others must have no access to it (chmod 600 {shown})"
        )
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
    assert!(f.start().await.unwrap_err().contains("mode 0604"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

    std::fs::write(&path, &good[..16]).unwrap();
    let e = f.start().await.unwrap_err();
    assert_eq!(
        e,
        format!("master key file {shown} is 16 bytes: a master key is exactly 32 bytes (256 bits)")
    );

    // Another key: not the one the secrets were sealed with.
    std::fs::write(&path, [7u8; KEY_LEN]).unwrap();
    let e = f.start().await.unwrap_err();
    assert!(
        e.starts_with(&format!("master key file {shown} holds master key ")),
        "{e}"
    );
    assert!(e.contains("it is not their key"), "{e}");

    // Not a file: a directory, a symlink (even to the right key).
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let e = f.start().await.unwrap_err();
    assert!(
        e.starts_with(&format!("master key file {shown} is not a regular file")),
        "{e}"
    );
    std::fs::remove_dir(&path).unwrap();
    let elsewhere = f.dir.path().join("elsewhere.key");
    std::fs::write(&elsewhere, &good).unwrap();
    std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
    assert!(
        f.start()
            .await
            .unwrap_err()
            .contains("is not a regular file")
    );
    std::fs::remove_file(&path).unwrap();

    // Unreadable: here its directory is a file (as root, permissions do not stop a read).
    let blocked = f.dir.path().join("not-a-dir");
    std::fs::write(&blocked, b"x").unwrap();
    let under_a_file = blocked.join("master.key");
    let e = Secrets::new(f.store.clone(), under_a_file.clone())
        .open()
        .await
        .unwrap_err();
    assert!(
        matches!(e, SecretError::KeyFile(KeyFileError::Unreadable { .. })),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!("master key file {} cannot be read", under_a_file.display())
    );

    // Missing while secrets exist: never replaced by a new key.
    let e = f.start().await.unwrap_err();
    assert!(
        e.starts_with(&format!(
            "master key file {shown} is missing, but the store holds 1 secrets sealed with master key "
        )),
        "{e}"
    );
    assert!(!path.exists(), "no new key was made");

    // Put back, all is well again.
    std::fs::write(&path, &good).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = f.start().await.unwrap();
    assert_eq!(
        s.resolve("alice", "TOKEN").await.unwrap().unwrap().expose(),
        "v1"
    );
}

#[tokio::test]
async fn set_list_delete_and_resolve_with_the_environment_as_the_operators_fallback() {
    let f = Fixture::new().await;
    let env = EnvSecrets::from_vars([
        ("HEARTH_SECRET_OPENAI".to_owned(), "sk-from-env".to_owned()),
        ("HEARTH_SECRET_SHADOWED".to_owned(), "env-value".to_owned()),
    ]);
    let s = f.secrets().with_env(env);
    // Loaded at the first use when nothing opened it.
    let (info, created) = s
        .set("default", "SHADOWED", &value("stored-value"), "operator")
        .await
        .unwrap();
    assert!(created);
    assert_eq!(info.name, "SHADOWED");
    assert_eq!(info.created_by, "operator");
    let (again, created) = s
        .set("default", "SHADOWED", &value("stored-2"), "admin")
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(again.created_by, "operator");
    assert_eq!(
        s.resolve("default", "SHADOWED")
            .await
            .unwrap()
            .unwrap()
            .expose(),
        "stored-2",
        "a stored secret wins over the environment"
    );
    assert_eq!(
        s.resolve("default", "OPENAI")
            .await
            .unwrap()
            .unwrap()
            .expose(),
        "sk-from-env"
    );
    assert!(
        s.resolve("alice", "OPENAI").await.unwrap().is_none(),
        "the host's environment is the operator's, not every organization's"
    );
    assert!(s.resolve("default", "NOPE").await.unwrap().is_none());
    assert_eq!(
        s.resolve("default", "bad").await.unwrap_err().code(),
        ErrorCode::InvalidName
    );

    let e = s
        .set("nowhere", "X", &value("v"), "admin")
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::OrgNotFound);
    let e = s.set("alice", "X", &value(""), "alice").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidRequest);
    s.set("alice", "B", &value("b"), "alice").await.unwrap();
    s.set("alice", "A", &value("a"), "alice").await.unwrap();
    let names: Vec<String> = s
        .list("alice")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["A", "B"]);
    s.delete("alice", "A").await.unwrap();
    let e = s.delete("alice", "A").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::SecretNotFound);
    assert_eq!(e.to_string(), "organization \"alice\" has no secret \"A\"");
    assert!(s.resolve("alice", "A").await.unwrap().is_none());
}

/// Every row's sealed value, to try other keys on.
async fn rows(store: &Store) -> Vec<SecretRecord> {
    let mut all = store.list_secrets("alice").await.unwrap();
    all.extend(store.list_secrets("default").await.unwrap());
    all
}

#[tokio::test]
async fn rotation_reencrypts_everything_and_the_old_key_decrypts_nothing() {
    let f = Fixture::new().await;
    let s = f.start().await.unwrap();
    s.set("alice", "ONE", &value("v-one"), "alice")
        .await
        .unwrap();
    s.set("default", "TWO", &value("v-two"), "admin")
        .await
        .unwrap();
    let old_bytes: [u8; KEY_LEN] = std::fs::read(f.path()).unwrap().try_into().unwrap();
    let old = MasterKey::from_bytes(old_bytes);
    let before = rows(&f.store).await;
    for r in &before {
        assert!(old.open(&r.org, &r.name, &r.sealed).is_ok());
    }

    let rotated = s.rotate().await.unwrap();
    assert_eq!(rotated.secrets, 2);
    assert_ne!(rotated.key_id, old.id());
    let new_bytes = std::fs::read(f.path()).unwrap();
    assert_ne!(new_bytes, old_bytes);
    assert_eq!(mode(&f.path()), 0o600);
    assert!(!pending_path(&f.path()).exists());
    assert_eq!(
        f.store.secret_key_ids().await.unwrap(),
        vec![(rotated.key_id.clone(), 2)]
    );
    for r in rows(&f.store).await {
        assert!(
            old.open(&r.org, &r.name, &r.sealed).is_err(),
            "the old key still decrypts {}",
            r.name
        );
        let was = before.iter().find(|b| b.name == r.name).unwrap();
        assert_ne!(r.sealed.nonce, was.sealed.nonce, "a fresh nonce");
    }
    assert_eq!(
        s.resolve("alice", "ONE").await.unwrap().unwrap().expose(),
        "v-one"
    );
    // And after a restart, with the new file.
    let later = f.start().await.unwrap();
    assert_eq!(
        later
            .resolve("default", "TWO")
            .await
            .unwrap()
            .unwrap()
            .expose(),
        "v-two"
    );
}

#[tokio::test]
async fn a_rotation_interrupted_before_its_commit_is_rolled_back_at_the_next_start() {
    let f = Fixture::new().await;
    let s = f.start().await.unwrap();
    s.set("alice", "ONE", &value("v-one"), "alice")
        .await
        .unwrap();
    let old = std::fs::read(f.path()).unwrap();
    // The crash: the new key is written, nothing is re-encrypted (and a write of another key
    // died before its link).
    s.stage_rotation().unwrap();
    assert!(pending_path(&f.path()).exists());
    let stale = f
        .path()
        .with_file_name(".master.key.new.tmp-0123456789abcdef");
    std::fs::write(&stale, [9u8; KEY_LEN]).unwrap();
    let e = s.rotate().await.unwrap_err();
    assert!(matches!(e, SecretError::RotationPending(_)), "{e}");
    drop(s);

    let s = f.start().await.unwrap();
    assert!(!pending_path(&f.path()).exists(), "rolled back");
    assert!(
        !stale.exists(),
        "the temporary file of the dead write is gone"
    );
    assert_eq!(std::fs::read(f.path()).unwrap(), old, "the old key stays");
    assert_eq!(
        s.resolve("alice", "ONE").await.unwrap().unwrap().expose(),
        "v-one"
    );
    // A rotation works again.
    s.rotate().await.unwrap();
}

#[tokio::test]
async fn a_rotation_interrupted_after_its_commit_is_finished_at_the_next_start() {
    let f = Fixture::new().await;
    let s = f.start().await.unwrap();
    s.set("alice", "ONE", &value("v-one"), "alice")
        .await
        .unwrap();
    s.set("alice", "TWO", &value("v-two"), "alice")
        .await
        .unwrap();
    let old = MasterKey::from_bytes(std::fs::read(f.path()).unwrap().try_into().unwrap());
    // The crash: the rows are re-encrypted and committed; the rename did not happen.
    let new = s.stage_rotation().unwrap();
    assert_eq!(s.reseal(&old, &new).await.unwrap(), 2);
    drop(s);

    let s = f.start().await.unwrap();
    assert!(!pending_path(&f.path()).exists());
    assert_eq!(
        MasterKey::from_bytes(std::fs::read(f.path()).unwrap().try_into().unwrap()).id(),
        new.id(),
        "the new key is in place"
    );
    assert_eq!(mode(&f.path()), 0o600);
    for name in ["ONE", "TWO"] {
        assert!(s.resolve("alice", name).await.unwrap().is_some());
    }
    for r in rows(&f.store).await {
        assert!(old.open(&r.org, &r.name, &r.sealed).is_err());
    }
}

#[tokio::test]
async fn a_rotation_that_meets_an_undecryptable_row_changes_nothing() {
    let f = Fixture::new().await;
    let s = f.start().await.unwrap();
    s.set("alice", "ONE", &value("v-one"), "alice")
        .await
        .unwrap();
    s.set("alice", "TWO", &value("v-two"), "alice")
        .await
        .unwrap();
    let old = std::fs::read(f.path()).unwrap();
    // TWO's ciphertext moved into ONE's row.
    let two = f.store.get_secret("alice", "TWO").await.unwrap().unwrap();
    let mut one = f.store.get_secret("alice", "ONE").await.unwrap().unwrap();
    one.sealed = two.sealed;
    f.store.put_secret(&one).await.unwrap();
    assert!(s.resolve("alice", "ONE").await.is_err());

    let e = s.rotate().await.unwrap_err();
    assert!(matches!(e, SecretError::Undecryptable { .. }), "{e}");
    assert!(e.to_string().contains("\"ONE\""), "{e}");
    assert_eq!(std::fs::read(f.path()).unwrap(), old);
    assert!(!pending_path(&f.path()).exists());
    assert_eq!(
        s.resolve("alice", "TWO").await.unwrap().unwrap().expose(),
        "v-two"
    );
}
