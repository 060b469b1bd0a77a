//! The store suite, run against SQLite and against a real PostgreSQL that the test starts on a
//! temp dir and a free loopback port (Debian's `postgresql` package) and stops at the end, also
//! when a case fails. Each case gets a database of its own.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::*;

fn record(name: &str) -> VmRecord {
    VmRecord {
        id: format!("id-{name}"),
        name: name.into(),
        state: VmState::Creating,
        cpus: 1,
        memory_mib: 1024,
        rootfs_mib: 10240,
        image: "img".into(),
        vmm: "qemu".into(),
        pid: None,
        created_at: now(),
        created_by: "operator".into(),
        org: "default".into(),
        updated_at: now(),
        last_error: None,
        net_index: None,
        egress: EgressRecord::default(),
        metadata: MetadataRecord::default(),
    }
}

fn to_error(kind: &str) -> Transition<'_> {
    Transition {
        from: VmState::Creating,
        to: VmState::Error,
        kind,
        message: Some("boom"),
        pid: None,
        last_error: Some(Some("boom")),
    }
}

async fn raw(store: &Store, sql: &str, id: &str) {
    store.execute_for_test(sql, id).await;
}

/// The stored state and last error, read without decoding the rest of the row.
async fn raw_state(store: &Store, id: &str) -> (String, Option<String>) {
    let row = sqlx::query("SELECT state, last_error FROM vms WHERE id = $1")
        .bind(id)
        .fetch_one(&store.pool)
        .await
        .unwrap();
    (row.get("state"), row.get("last_error"))
}

/// The whole suite, on databases `fresh` makes (a new, empty database URL per call).
async fn run_suite(fresh: impl AsyncFn() -> String) {
    insert_get_list_delete(&fresh().await).await;
    a_name_wins_over_an_id_that_looks_the_same(&fresh().await).await;
    transitions_are_checked_and_recorded(&fresh().await).await;
    concurrent_transitions_let_exactly_one_win(&fresh().await).await;
    a_corrupted_row_is_reported_alone_and_can_be_marked_error(&fresh().await).await;
    pids_events_and_cascading_delete(&fresh().await).await;
    reopening_keeps_data_and_skips_migrations(&fresh().await).await;
    a_newer_schema_is_refused(&fresh().await).await;
    addresses_are_unique_lowest_first_and_released(&fresh().await).await;
    concurrent_creates_never_share_an_address(&fresh().await).await;
    networks_members_and_egress(&fresh().await).await;
    backups_belong_to_their_vm_and_go_with_it(&fresh().await).await;
    resize_and_restore_change_only_a_stopped_vm(&fresh().await).await;
    volumes_attach_to_one_vm_and_outlive_it(&fresh().await).await;
    users_orgs_keys_and_the_audit_log(&fresh().await).await;
    secrets_are_sealed_rows_unique_per_org_and_resealed_at_once(&fresh().await).await;
}

async fn secrets_are_sealed_rows_unique_per_org_and_resealed_at_once(url: &str) {
    use super::secret::{Sealed, SecretRecord};
    let store = Store::open(url).await.unwrap();
    store.ensure_org("default").await.unwrap();
    store.ensure_org("other").await.unwrap();
    // Bytes that are not UTF-8 survive, on both backends.
    let sealed = |tag: u8, key: &str| Sealed {
        ciphertext: vec![0xff, 0x00, tag, 0x80],
        nonce: vec![tag; 24],
        key_id: key.into(),
    };
    let secret = |org: &str, name: &str, tag: u8, at: &str| SecretRecord {
        org: org.into(),
        name: name.into(),
        sealed: sealed(tag, "k1"),
        created_at: at.into(),
        created_by: "alice".into(),
        updated_at: at.into(),
    };
    let (stored, created) = store
        .put_secret(&secret("default", "API_KEY", 1, "2026-01-01T00:00:00.000Z"))
        .await
        .unwrap();
    assert!(created);
    assert_eq!(stored.sealed, sealed(1, "k1"));
    // The same name in another organization is another secret.
    let (_, created) = store
        .put_secret(&secret("other", "API_KEY", 2, "2026-01-01T00:00:00.000Z"))
        .await
        .unwrap();
    assert!(created);
    // Setting it again replaces the value and keeps who made it and when.
    let mut again = secret("default", "API_KEY", 3, "2026-02-02T00:00:00.000Z");
    again.created_by = "bob".into();
    let (stored, created) = store.put_secret(&again).await.unwrap();
    assert!(!created);
    assert_eq!(stored.created_by, "alice");
    assert_eq!(stored.created_at, "2026-01-01T00:00:00.000Z");
    assert_eq!(stored.updated_at, "2026-02-02T00:00:00.000Z");
    let got = store
        .get_secret("default", "API_KEY")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, stored);
    assert_eq!(
        store
            .get_secret("other", "API_KEY")
            .await
            .unwrap()
            .unwrap()
            .sealed,
        sealed(2, "k1")
    );
    assert!(store.get_secret("default", "NOPE").await.unwrap().is_none());
    let e = store
        .put_secret(&secret("nowhere", "X", 1, "2026-01-01T00:00:00.000Z"))
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::NoOrg(ref o) if o == "nowhere"),
        "{e}"
    );
    store
        .put_secret(&secret("default", "B_TOKEN", 4, "2026-01-01T00:00:00.000Z"))
        .await
        .unwrap();
    let names: Vec<String> = store
        .list_secrets("default")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["API_KEY", "B_TOKEN"]);
    assert_eq!(
        store.secret_key_ids().await.unwrap(),
        vec![("k1".to_owned(), 3)]
    );

    // Resealing changes every row in one transaction, or none when one fails.
    let failed: Result<u64, StoreError> = store
        .reseal_secrets(|r| {
            if r.name == "B_TOKEN" {
                Err(StoreError::NoOrg("refused".into()))
            } else {
                Ok(sealed(9, "k2"))
            }
        })
        .await;
    assert!(failed.is_err());
    assert_eq!(
        store.secret_key_ids().await.unwrap(),
        vec![("k1".to_owned(), 3)],
        "a failed reseal leaves every row as it was"
    );
    let n = store
        .reseal_secrets(|r| {
            let mut s = r.sealed.clone();
            s.key_id = "k2".into();
            s.nonce = vec![7; 24];
            Ok::<_, StoreError>(s)
        })
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(
        store.secret_key_ids().await.unwrap(),
        vec![("k2".to_owned(), 3)]
    );
    let got = store
        .get_secret("default", "API_KEY")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.sealed.nonce, vec![7; 24]);
    assert_eq!(got.sealed.ciphertext, sealed(3, "k2").ciphertext);
    assert_eq!(
        got.updated_at, "2026-02-02T00:00:00.000Z",
        "a reseal is no new value"
    );

    assert!(store.delete_secret("default", "API_KEY").await.unwrap());
    assert!(!store.delete_secret("default", "API_KEY").await.unwrap());
    assert!(
        store
            .get_secret("other", "API_KEY")
            .await
            .unwrap()
            .is_some()
    );
    store.close().await;
}

async fn users_orgs_keys_and_the_audit_log(url: &str) {
    use super::access::{ApiKeyRecord, AuditFilter, AuditRecord, SshKeyRecord, UserRecord};
    use hearth_api::Role;
    let store = Store::open(url).await.unwrap();
    assert_eq!(store.count_users().await.unwrap(), 0);
    store.ensure_org("default").await.unwrap();
    store.ensure_org("default").await.unwrap();
    let user = |name: &str| UserRecord {
        name: name.into(),
        admin: false,
        active_org: None,
        created_at: now(),
    };
    let key = |fp: &str, user: &str| SshKeyRecord {
        fingerprint: fp.into(),
        user: user.into(),
        public_key: "ssh-ed25519 AAAA".into(),
        comment: String::new(),
        created_at: now(),
    };
    store
        .create_user(
            &user("alice"),
            "alice",
            true,
            Role::Owner,
            Some(&key("SHA256:a", "alice")),
        )
        .await
        .unwrap();
    // A taken name, a missing org, a taken key: refused whole.
    for (u, org, new, k) in [
        ("alice", "x", true, None),
        ("bob", "alice", true, None),
        ("bob", "nowhere", false, None),
        ("bob", "alice", false, Some(key("SHA256:a", "bob"))),
    ] {
        let e = store
            .create_user(&user(u), org, new, Role::Member, k.as_ref())
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::Taken(..) | StoreError::NoOrg(_)),
            "{u} {org}: {e}"
        );
    }
    assert_eq!(store.count_users().await.unwrap(), 1);
    assert!(store.get_user("bob").await.unwrap().is_none());
    store
        .create_user(&user("bob"), "alice", false, Role::Member, None)
        .await
        .unwrap();
    assert_eq!(
        store.memberships("bob").await.unwrap(),
        vec![("alice".to_owned(), Role::Member)]
    );
    assert_eq!(
        store
            .get_user("bob")
            .await
            .unwrap()
            .unwrap()
            .active_org
            .as_deref(),
        Some("alice")
    );
    store.create_org("ops", "bob").await.unwrap();
    assert!(matches!(
        store.create_org("ops", "alice").await,
        Err(StoreError::Taken(..))
    ));
    store
        .set_member("ops", "alice", Role::Member)
        .await
        .unwrap();
    store.set_member("ops", "alice", Role::Owner).await.unwrap();
    assert_eq!(
        store.org_members("ops").await.unwrap(),
        vec![
            ("alice".to_owned(), Role::Owner),
            ("bob".to_owned(), Role::Owner)
        ]
    );
    assert_eq!(store.list_ssh_keys(Some("alice")).await.unwrap().len(), 1);
    assert_eq!(store.list_ssh_keys(None).await.unwrap().len(), 1);
    assert_eq!(
        store.ssh_key("SHA256:a").await.unwrap().unwrap().user,
        "alice"
    );
    store.add_ssh_key(&key("SHA256:b", "bob")).await.unwrap();
    assert!(!store.remove_ssh_key("alice", "SHA256:b").await.unwrap());
    assert!(store.remove_ssh_key("bob", "SHA256:b").await.unwrap());
    let api = ApiKeyRecord {
        id: "k1".into(),
        user: "bob".into(),
        org: "ops".into(),
        name: "ci".into(),
        hash: "ab".into(),
        created_at: now(),
    };
    store.insert_api_key(&api).await.unwrap();
    assert_eq!(store.api_key("k1").await.unwrap().as_ref(), Some(&api));
    assert_eq!(store.list_api_keys(Some("alice")).await.unwrap(), vec![]);
    assert_eq!(store.list_api_keys(None).await.unwrap(), vec![api]);
    store.set_active_org("bob", "ops").await.unwrap();
    // Leaving an org takes the keys made for it and the active org with it.
    assert!(store.remove_member("ops", "bob").await.unwrap());
    assert!(!store.remove_member("ops", "bob").await.unwrap());
    assert!(store.api_key("k1").await.unwrap().is_none());
    assert_eq!(
        store.get_user("bob").await.unwrap().unwrap().active_org,
        None
    );
    // Deleting a user takes its keys and memberships.
    assert!(store.delete_user("alice").await.unwrap());
    assert!(store.ssh_key("SHA256:a").await.unwrap().is_none());
    assert!(store.memberships("alice").await.unwrap().is_empty());
    assert!(!store.delete_user("alice").await.unwrap());

    assert_eq!(store.network_org("nope").await.unwrap(), None);
    store.create_network("backend", "ops").await.unwrap();
    assert_eq!(
        store.network_org("backend").await.unwrap().as_deref(),
        Some("ops")
    );

    for i in 0..5 {
        store
            .insert_audit(&AuditRecord {
                at: format!("2026-01-0{}T00:00:00.000Z", i + 1),
                principal: if i % 2 == 0 { "bob" } else { "anonymous" }.into(),
                org: None,
                source: "unix".into(),
                action: "get_vm".into(),
                target: Some("web".into()),
                allowed: i % 2 == 0,
                result: "ok".into(),
                duration_ms: i,
                request_id: format!("r{i}"),
            })
            .await
            .unwrap();
    }
    let all = AuditFilter {
        limit: 100,
        ..AuditFilter::default()
    };
    let rows = store.audit(&all).await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        ["r4", "r3", "r2", "r1", "r0"]
    );
    let bob = AuditFilter {
        principal: Some("bob".into()),
        decision: Some("allow".into()),
        since: Some("2026-01-02T00:00:00.000Z".into()),
        ..all.clone()
    };
    let rows = store.audit(&bob).await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        ["r4", "r2"]
    );
    store.prune_audit(2).await.unwrap();
    let rows = store.audit(&all).await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        ["r4", "r3"]
    );
}

fn volume(name: &str) -> VolumeRecord {
    VolumeRecord {
        id: format!("vol-{name}"),
        name: name.into(),
        size_mib: 1 << 40,
        created_at: now(),
        formatted: false,
        vm_id: None,
        vm_name: None,
        path: None,
        org: "default".into(),
    }
}

async fn volumes_attach_to_one_vm_and_outlive_it(url: &str) {
    let store = Store::open(url).await.unwrap();
    let mut a = record("a");
    a.state = VmState::Stopped;
    store.insert_vm(&a).await.unwrap();
    store.insert_volume(&volume("data")).await.unwrap();
    store.insert_volume(&volume("logs")).await.unwrap();
    store.insert_volume(&volume("spare")).await.unwrap();
    assert!(matches!(
        store.insert_volume(&volume("data")).await.unwrap_err(),
        StoreError::VolumeTaken(_)
    ));
    assert_eq!(
        store.get_volume("data").await.unwrap().size_mib,
        1 << 40,
        "sizes past 32 bits survive"
    );
    store.attach_volume("id-a", "data", "/data").await.unwrap();
    // Another volume at the same path of the same VM is refused; the VM's own volume moves.
    assert!(matches!(
        store
            .attach_volume("id-a", "logs", "/data")
            .await
            .unwrap_err(),
        StoreError::VolumePathTaken { .. }
    ));
    store.attach_volume("id-a", "logs", "/logs").await.unwrap();
    store
        .attach_volume("id-a", "logs", "/var/log/app")
        .await
        .unwrap();
    assert!(matches!(
        store.attach_volume("id-a", "nope", "/x").await.unwrap_err(),
        StoreError::NoVolume(_)
    ));
    // A new VM cannot take a volume another VM has, and then is not made at all.
    let err = store
        .insert_vm_with(
            &record("b"),
            None,
            &[],
            &[("spare".into(), "/s".into()), ("data".into(), "/d".into())],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::VolumeAttached { volume, vm } if volume == "data" && vm == "a"),
        "{err}"
    );
    assert!(matches!(
        store.get_vm("b").await.unwrap_err(),
        StoreError::NotFound(_)
    ));
    assert_eq!(store.get_volume("spare").await.unwrap().vm_id, None);
    // Deleting an attached volume is refused, naming the VM.
    let err = store.delete_volume("data").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::VolumeAttached { vm, .. } if vm == "a"),
        "{err}"
    );
    let on_a: Vec<_> = store
        .vm_volumes("id-a")
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.name, v.path, v.vm_name))
        .collect();
    let a_name = Some("a".to_owned());
    assert_eq!(
        on_a,
        [
            ("data".into(), Some("/data".into()), a_name.clone()),
            ("logs".into(), Some("/var/log/app".into()), a_name)
        ]
    );
    // Not while the VM runs.
    let mut r = record("r");
    r.state = VmState::Running;
    store.insert_vm(&r).await.unwrap();
    assert!(matches!(
        store
            .attach_volume("id-r", "spare", "/s")
            .await
            .unwrap_err(),
        StoreError::NotFound(_)
    ));
    assert!(matches!(
        store.detach_volume("id-a", "spare").await.unwrap_err(),
        StoreError::VolumeNotAttached { .. }
    ));
    store.detach_volume("id-a", "logs").await.unwrap();
    store.mark_formatted("vol-logs").await.unwrap();
    let logs = store.get_volume("logs").await.unwrap();
    assert!(logs.formatted && logs.vm_id.is_none() && logs.path.is_none());
    let kinds: Vec<String> = store
        .events("id-a")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "created",
            "volume_attached",
            "volume_attached",
            "volume_attached",
            "volume_detached"
        ]
    );
    // Deleting the VM detaches its volumes and keeps them.
    store.delete_vm("id-a").await.unwrap();
    let data = store.get_volume("data").await.unwrap();
    assert_eq!((data.vm_id, data.path), (None, None));
    store.delete_volume("data").await.unwrap();
    assert!(matches!(
        store.delete_volume("data").await.unwrap_err(),
        StoreError::NoVolume(_)
    ));
    let mut ids = store.all_volume_ids().await.unwrap();
    ids.sort();
    assert_eq!(ids, ["vol-logs", "vol-spare"]);
    store.close().await;
}

fn backup(id: &str, vm_id: &str) -> BackupRecord {
    BackupRecord {
        id: id.into(),
        vm_id: vm_id.into(),
        created_at: now(),
        created_by: "operator".into(),
        cpus: 2,
        memory_mib: 512,
        rootfs_mib: 1024,
        size_bytes: 1 << 40,
    }
}

async fn backups_belong_to_their_vm_and_go_with_it(url: &str) {
    let store = Store::open(url).await.unwrap();
    store.insert_vm(&record("a")).await.unwrap();
    store.insert_vm(&record("b")).await.unwrap();
    store.insert_backup(&backup("b1", "id-a")).await.unwrap();
    store.insert_backup(&backup("b2", "id-a")).await.unwrap();
    store.insert_backup(&backup("b3", "id-b")).await.unwrap();
    let list = store.list_backups("id-a").await.unwrap();
    assert_eq!(list, [backup_at(&list[0], "b1"), backup_at(&list[1], "b2")]);
    assert_eq!(list[0].size_bytes, 1 << 40, "sizes past 32 bits survive");
    // A backup of another VM is not found through this one.
    let err = store.get_backup("id-a", "a", "b3").await.unwrap_err();
    assert!(matches!(err, StoreError::NoBackup { .. }), "{err}");
    assert_eq!(store.get_backup("id-b", "b", "b3").await.unwrap().id, "b3");
    store.delete_backup("id-a", "a", "b1").await.unwrap();
    assert!(matches!(
        store.delete_backup("id-a", "a", "b1").await.unwrap_err(),
        StoreError::NoBackup { .. }
    ));
    let kinds: Vec<String> = store
        .events("id-a")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "created",
            "backup_created",
            "backup_created",
            "backup_deleted"
        ]
    );
    store.delete_vm("id-a").await.unwrap();
    let mut all = store.all_backups().await.unwrap();
    all.sort();
    assert_eq!(
        all,
        [("id-b".to_owned(), "b3".to_owned())],
        "a VM's backups go with it"
    );
    store.close().await;
}

/// `b` with the id `id` (the list's order is checked by id; the rest is as inserted).
fn backup_at(b: &BackupRecord, id: &str) -> BackupRecord {
    BackupRecord {
        id: id.into(),
        created_at: b.created_at.clone(),
        ..backup(id, "id-a")
    }
}

async fn resize_and_restore_change_only_a_stopped_vm(url: &str) {
    let store = Store::open(url).await.unwrap();
    let mut vm = record("a");
    vm.state = VmState::Stopped;
    store.insert_vm(&vm).await.unwrap();
    store
        .resize_vm("id-a", (4, 2048, 20480), "cpus 1 -> 4")
        .await
        .unwrap();
    let got = store.get_vm("a").await.unwrap();
    assert_eq!((got.cpus, got.memory_mib, got.rootfs_mib), (4, 2048, 20480));
    store.restored("id-a", &backup("b1", "id-a")).await.unwrap();
    assert_eq!(store.get_vm("a").await.unwrap().rootfs_mib, 1024);
    // Not once it runs.
    let mut running = record("r");
    running.state = VmState::Running;
    store.insert_vm(&running).await.unwrap();
    assert!(matches!(
        store
            .resize_vm("id-r", (2, 1024, 10240), "x")
            .await
            .unwrap_err(),
        StoreError::NotFound(_)
    ));
    assert!(matches!(
        store
            .restored("id-r", &backup("b1", "id-r"))
            .await
            .unwrap_err(),
        StoreError::NotFound(_)
    ));
    store.close().await;
}

async fn addresses_are_unique_lowest_first_and_released(url: &str) {
    let store = Store::open(url).await.unwrap();
    let mut taken = Vec::new();
    for name in ["a", "b", "c"] {
        let vm = store
            .insert_vm_with(&record(name), Some(3), &[], &[])
            .await
            .unwrap();
        taken.push(vm.net_index);
        assert_eq!(store.get_vm(name).await.unwrap().net_index, vm.net_index);
    }
    assert_eq!(taken, [Some(0), Some(1), Some(2)]);
    let err = store
        .insert_vm_with(&record("d"), Some(3), &[], &[])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoAddresses { slots: 3 }), "{err}");
    // Nothing of the refused VM was kept.
    assert!(matches!(
        store.get_vm("d").await,
        Err(StoreError::NotFound(_))
    ));
    // A deleted VM's address is free again, and the lowest free one is handed out first.
    store.delete_vm("id-b").await.unwrap();
    let vm = store
        .insert_vm_with(&record("e"), Some(3), &[], &[])
        .await
        .unwrap();
    assert_eq!(vm.net_index, Some(1));
    store.delete_vm("id-a").await.unwrap();
    let vm = store
        .insert_vm_with(&record("f"), Some(3), &[], &[])
        .await
        .unwrap();
    assert_eq!(vm.net_index, Some(0));
    // A VM without networking holds no address.
    store.insert_vm(&record("g")).await.unwrap();
    assert_eq!(store.get_vm("g").await.unwrap().net_index, None);
    store.close().await;
}

async fn concurrent_creates_never_share_an_address(url: &str) {
    let store = Store::open(url).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .insert_vm_with(&record(&format!("vm{i}")), Some(64), &[], &[])
                    .await
                    .unwrap()
                    .net_index
            })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap().unwrap());
    }
    got.sort_unstable();
    assert_eq!(got, (0..8).collect::<Vec<u32>>());
    store.close().await;
}

async fn networks_members_and_egress(url: &str) {
    let store = Store::open(url).await.unwrap();
    store.create_network("backend", "default").await.unwrap();
    assert!(matches!(
        store.create_network("backend", "default").await,
        Err(StoreError::NetworkTaken(_))
    ));
    // Joining a network that does not exist leaves no VM behind.
    let err = store
        .insert_vm_with(&record("a"), Some(4), &["nope".into()], &[])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NoNetwork(ref n) if n == "nope"),
        "{err}"
    );
    assert!(matches!(
        store.get_vm("a").await,
        Err(StoreError::NotFound(_))
    ));
    let a = store
        .insert_vm_with(&record("a"), Some(4), &["backend".into()], &[])
        .await
        .unwrap();
    store
        .insert_vm_with(&record("b"), Some(4), &[], &[])
        .await
        .unwrap();
    assert_eq!(store.vm_networks(&a.id).await.unwrap(), ["backend"]);
    assert!(store.join_network("backend", "id-b").await.unwrap());
    assert!(!store.join_network("backend", "id-b").await.unwrap());
    let nets = store.list_networks().await.unwrap();
    assert_eq!(nets.len(), 1);
    assert_eq!(nets[0].members, ["id-a", "id-b"]);
    let err = store.delete_network("backend").await.unwrap_err();
    assert!(err.to_string().contains("a, b"), "{err}");
    assert!(store.leave_network("backend", "id-b").await.unwrap());
    assert!(!store.leave_network("backend", "id-b").await.unwrap());
    let kinds: Vec<_> = store
        .events("id-b")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(
        kinds.contains(&"network_joined".to_owned()) && kinds.contains(&"network_left".to_owned()),
        "{kinds:?}"
    );
    // A deleted VM leaves its networks.
    store.delete_vm("id-a").await.unwrap();
    assert!(
        store
            .get_network("backend")
            .await
            .unwrap()
            .members
            .is_empty()
    );
    store.delete_network("backend").await.unwrap();
    assert!(matches!(
        store.delete_network("backend").await,
        Err(StoreError::NoNetwork(_))
    ));

    let egress = EgressRecord {
        deny_all: true,
        allow_cidrs: vec!["10.1.0.0/16".into()],
        allow_ports: vec![443],
        allow_domains: vec!["*.example.com".into()],
        ..EgressRecord::default()
    };
    store
        .set_egress("id-b", &egress, "egress: deny_all")
        .await
        .unwrap();
    assert_eq!(store.get_vm("b").await.unwrap().egress, egress);
    assert!(matches!(
        store.set_egress("id-gone", &egress, "x").await,
        Err(StoreError::NotFound(_))
    ));
    store.close().await;
}

async fn insert_get_list_delete(url: &str) {
    let store = Store::open(url).await.unwrap();
    store.insert_vm(&record("a")).await.unwrap();
    store.insert_vm(&record("b")).await.unwrap();
    assert!(matches!(
        store.insert_vm(&VmRecord { id: "other".into(), ..record("a") }).await,
        Err(StoreError::NameTaken(n)) if n == "a"
    ));
    let a = store.get_vm("a").await.unwrap();
    assert_eq!(a, record("a").with_times(&a));
    assert_eq!(store.get_vm("id-b").await.unwrap().name, "b");
    let list = store.list_vms().await.unwrap();
    assert_eq!(
        list.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert!(list.unreadable.is_empty());
    store.delete_vm("id-a").await.unwrap();
    assert!(matches!(
        store.get_vm("a").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.delete_vm("id-a").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(store.events("id-a").await.unwrap().is_empty());
    store.close().await;
}

impl VmRecord {
    /// `self` with the timestamps of `other`, to compare the rest.
    fn with_times(self, other: &VmRecord) -> VmRecord {
        VmRecord {
            created_at: other.created_at.clone(),
            updated_at: other.updated_at.clone(),
            ..self
        }
    }
}

async fn a_name_wins_over_an_id_that_looks_the_same(url: &str) {
    let store = Store::open(url).await.unwrap();
    store.insert_vm(&record("a")).await.unwrap();
    // A VM named like the other VM's id.
    let b = VmRecord {
        id: "id-b".into(),
        name: "id-a".into(),
        ..record("b")
    };
    store.insert_vm(&b).await.unwrap();
    assert_eq!(store.get_vm("id-a").await.unwrap().id, "id-b");
    assert_eq!(store.get_vm("a").await.unwrap().id, "id-a");
    store.close().await;
}

async fn transitions_are_checked_and_recorded(url: &str) {
    let store = Store::open(url).await.unwrap();
    store.insert_vm(&record("a")).await.unwrap();
    let t = to_error("create_failed");
    let vm = store.transition("id-a", &t).await.unwrap();
    assert_eq!(vm.state, VmState::Error);
    assert_eq!(vm.last_error.as_deref(), Some("boom"));
    assert_eq!(store.get_vm("a").await.unwrap(), vm);
    // Same transition again: the VM is no longer in `creating`.
    assert!(matches!(
        store.transition("id-a", &t).await,
        Err(StoreError::StateChanged {
            found: VmState::Error,
            ..
        })
    ));
    assert!(matches!(
        store.transition("nope", &t).await,
        Err(StoreError::NotFound(_))
    ));
    let events = store.events("id-a").await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].kind, "created");
    assert_eq!(events[0].to_state, Some(VmState::Creating));
    assert_eq!(events[1].from_state, Some(VmState::Creating));
    assert_eq!(events[1].to_state, Some(VmState::Error));
    assert_eq!(events[1].message.as_deref(), Some("boom"));
    // Clearing the error and setting a pid.
    let vm = store
        .transition(
            "id-a",
            &Transition {
                from: VmState::Error,
                to: VmState::Running,
                kind: "running",
                message: None,
                pid: Some(Some(4242)),
                last_error: Some(None),
            },
        )
        .await
        .unwrap();
    assert_eq!((vm.pid, vm.last_error), (Some(4242), None));
    assert_eq!(store.get_vm("a").await.unwrap().pid, Some(4242));
    store.close().await;
}

/// The compare-and-set of `transition` holds under concurrency: of two transitions out of the
/// same state, one wins and the other sees the new state.
async fn concurrent_transitions_let_exactly_one_win(url: &str) {
    let store = Store::open(url).await.unwrap();
    for i in 0..10 {
        let name = format!("c{i}");
        store.insert_vm(&record(&name)).await.unwrap();
        let id = format!("id-{name}");
        let stop = Transition {
            to: VmState::Stopped,
            ..to_error("created")
        };
        let fail = to_error("create_failed");
        let (a, b) = tokio::join!(store.transition(&id, &fail), store.transition(&id, &stop));
        let lost = match (a, b) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
            other => panic!("exactly one transition must win, got {other:?}"),
        };
        assert!(
            matches!(lost, StoreError::StateChanged { .. }),
            "the loser must see the new state: {lost}"
        );
        assert_eq!(store.events(&id).await.unwrap().len(), 2);
    }
    store.close().await;
}

async fn a_corrupted_row_is_reported_alone_and_can_be_marked_error(url: &str) {
    let store = Store::open(url).await.unwrap();
    for name in ["a", "b", "c"] {
        store.insert_vm(&record(name)).await.unwrap();
    }
    // A state this hearthd does not know (a newer one wrote it) and a number out of range.
    raw(
        &store,
        "UPDATE vms SET state = 'hibernating' WHERE id = $1",
        "id-b",
    )
    .await;
    raw(&store, "UPDATE vms SET cpus = -1 WHERE id = $1", "id-c").await;
    let list = store.list_vms().await.unwrap();
    assert_eq!(
        list.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["a"]
    );
    let bad: Vec<_> = list
        .unreadable
        .iter()
        .map(|u| {
            (
                u.id.as_str(),
                u.name.as_deref(),
                u.state,
                u.error.to_string(),
            )
        })
        .collect();
    assert_eq!(
        bad,
        [
            (
                "id-b",
                Some("b"),
                None,
                "the stored VM \"id-b\" cannot be read: column state holds \"hibernating\", which is no VM state".to_owned()
            ),
            (
                "id-c",
                Some("c"),
                Some(VmState::Creating),
                "the stored VM \"id-c\" cannot be read: column cpus holds -1, out of range for u32".to_owned()
            ),
        ]
    );
    assert!(matches!(
        store.get_vm("b").await,
        Err(StoreError::Unreadable {
            column: "state",
            ..
        })
    ));
    // Settled by id although the row does not decode.
    for id in ["id-b", "id-c"] {
        store
            .mark_error(id, "recovery_failed", "the stored record cannot be read")
            .await
            .unwrap();
        assert_eq!(
            raw_state(&store, id).await,
            (
                "error".to_owned(),
                Some("the stored record cannot be read".to_owned())
            )
        );
        let last = store.events(id).await.unwrap().pop().unwrap();
        assert_eq!(last.kind, "recovery_failed");
        assert_eq!(
            (last.from_state, last.to_state),
            (None, Some(VmState::Error))
        );
    }
    // b's only damage was its state: it reads again; c still does not, now in `error`.
    let list = store.list_vms().await.unwrap();
    assert_eq!(
        list.vms
            .iter()
            .map(|v| (v.name.as_str(), v.state))
            .collect::<Vec<_>>(),
        [("a", VmState::Creating), ("b", VmState::Error)]
    );
    assert_eq!(list.unreadable.len(), 1);
    assert_eq!(list.unreadable[0].state, Some(VmState::Error));
    assert!(matches!(
        store.mark_error("nope", "recovery_failed", "x").await,
        Err(StoreError::NotFound(_))
    ));
    store.close().await;
}

async fn pids_events_and_cascading_delete(url: &str) {
    let store = Store::open(url).await.unwrap();
    store.insert_vm(&record("a")).await.unwrap();
    store
        .set_pid("id-a", 77, "vmm_launched", "qemu launched")
        .await
        .unwrap();
    store
        .set_pid("id-a", 78, "readopted", "re-attached")
        .await
        .unwrap();
    assert_eq!(store.get_vm("a").await.unwrap().pid, Some(78));
    let events = store.events("id-a").await.unwrap();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.kind.as_str(), e.message.as_deref()))
            .collect::<Vec<_>>(),
        [
            ("created", None),
            ("vmm_launched", Some("qemu launched")),
            ("readopted", Some("re-attached")),
        ]
    );
    let api: hearth_api::VmEvent = events[1].clone().into();
    assert_eq!(api.kind, "vmm_launched");
    raw(
        &store,
        "UPDATE vm_events SET to_state = 'melted' WHERE vm_id = $1",
        "id-a",
    )
    .await;
    assert_eq!(
        store.events("id-a").await.unwrap_err().to_string(),
        "an event of VM \"id-a\" cannot be read: column to_state holds \"melted\", which is no VM state"
    );
    store.delete_vm("id-a").await.unwrap();
    let left: i64 = sqlx::query("SELECT COUNT(*) AS n FROM vm_events")
        .fetch_one(&store.pool)
        .await
        .unwrap()
        .get("n");
    assert_eq!(left, 0, "deleting a VM deletes its events");
    store.close().await;
}

async fn reopening_keeps_data_and_skips_migrations(url: &str) {
    let store = Store::open(url).await.unwrap();
    store.insert_vm(&record("a")).await.unwrap();
    store.close().await;
    let store = Store::open(url).await.unwrap();
    assert_eq!(store.list_vms().await.unwrap().vms.len(), 1);
    let versions: i64 = sqlx::query("SELECT COUNT(*) AS n FROM schema_migrations")
        .fetch_one(&store.pool)
        .await
        .unwrap()
        .get("n");
    assert_eq!(versions, store.backend.migrations().len() as i64);
    store.close().await;
}

async fn a_newer_schema_is_refused(url: &str) {
    let store = Store::open(url).await.unwrap();
    raw(
        &store,
        "INSERT INTO schema_migrations (version, applied_at) VALUES (999, $1)",
        "later",
    )
    .await;
    store.close().await;
    let err = Store::open(url).await.unwrap_err();
    assert!(
        matches!(err, StoreError::TooNew { found: 999, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn store_suite_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicU32::new(0);
    run_suite(async || {
        let db = dir
            .path()
            .join(format!("{}.db", n.fetch_add(1, Ordering::Relaxed)));
        format!("sqlite://{}", db.display())
    })
    .await;
}

#[tokio::test]
async fn store_suite_on_postgres() {
    let pg = Postgres::start().await;
    run_suite(async || pg.fresh_database().await).await;
    // Over the server's unix socket, in the URL form README.md shows.
    let tcp = pg.fresh_database().await;
    let database = tcp.rsplit('/').next().unwrap();
    let url = format!(
        "postgres://postgres@localhost:{}/{database}?host={}",
        pg.port,
        pg.socket.display()
    );
    let store = Store::open(&url).await.unwrap();
    store.insert_vm(&record("a")).await.unwrap();
    assert_eq!(store.get_vm("a").await.unwrap().id, "id-a");
    store.close().await;
}

#[test]
fn both_backends_have_the_same_migration_versions() {
    let versions = |b: Backend| b.migrations().iter().map(|m| m.0).collect::<Vec<_>>();
    assert_eq!(versions(Backend::Sqlite), versions(Backend::Postgres));
    assert_eq!(
        versions(Backend::Sqlite),
        (1..=SQLITE_MIGRATIONS.len() as i64).collect::<Vec<_>>()
    );
}

#[test]
fn states_are_stored_in_the_stores_own_spelling() {
    let stored: Vec<_> = VmState::ALL.into_iter().map(state_text).collect();
    // Changing one of these is a schema change: it needs a migration. Adding one is not
    // (`paused` came with pause and resume), though an older hearthd reads such a row as
    // unreadable.
    assert_eq!(
        stored,
        [
            "creating", "stopped", "starting", "running", "paused", "stopping", "error", "deleting"
        ]
    );
    for s in VmState::ALL {
        assert_eq!(state_from_text(state_text(s)), Some(s));
    }
}

#[test]
fn urls_name_their_backend_and_lose_their_password_in_messages() {
    assert_eq!(Backend::of_url("sqlite:///x/h.db"), Some(Backend::Sqlite));
    assert_eq!(Backend::of_url("postgres://h/db"), Some(Backend::Postgres));
    assert_eq!(
        Backend::of_url("postgresql://h/db"),
        Some(Backend::Postgres)
    );
    assert_eq!(Backend::of_url("mysql://h/db"), None);
    assert_eq!(
        redact_url("postgres://hearth:s3cret@db.example:5432/hearth?sslmode=prefer"),
        "postgres://hearth:***@db.example:5432/hearth?sslmode=prefer"
    );
    assert_eq!(
        redact_url("postgres://hearth@db/hearth?password=s3cret&application_name=h"),
        "postgres://hearth@db/hearth?password=***&application_name=h"
    );
    assert_eq!(
        redact_url("sqlite:///var/lib/hearth/hearth.db"),
        "sqlite:///var/lib/hearth/hearth.db"
    );
}

#[tokio::test]
async fn an_unsupported_or_unreachable_database_is_named_without_its_password() {
    let err = Store::open("mysql://u:pw@localhost/db").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "database URL \"mysql://u:***@localhost/db\" names no supported database: use sqlite://PATH or postgres://USER@HOST/DATABASE"
    );
    // Port 1 on loopback: nothing listens there.
    let err = Store::open("postgres://u:pw@127.0.0.1:1/db")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot open the database postgres://u:***@127.0.0.1:1/db"
    );
}

#[tokio::test]
async fn the_sqlite_file_and_its_journal_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hearth.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    store.insert_vm(&record("a")).await.unwrap();
    for file in [
        path.clone(),
        path.with_extension("db-wal"),
        path.with_extension("db-shm"),
    ] {
        let mode = std::fs::metadata(&file)
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{} has mode {mode:o}", file.display());
    }
    let mode: String = sqlx::query("PRAGMA journal_mode")
        .fetch_one(&store.pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode, "wal");
    let fk: i64 = sqlx::query("PRAGMA foreign_keys")
        .fetch_one(&store.pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(fk, 1);
    store.close().await;
    let err = Store::open("sqlite:///nonexistent-dir-for-hearth/h.db")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot create the database file /nonexistent-dir-for-hearth/h.db"
    );
}

/// SQLite stores whatever bytes it is given: text that is not UTF-8 fails the whole query in
/// the driver, and the listing still finds every other VM.
#[tokio::test]
async fn a_row_the_sqlite_driver_cannot_convert_is_reported_alone() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = Store::open(&url).await.unwrap();
    store.insert_vm(&record("a")).await.unwrap();
    store.insert_vm(&record("b")).await.unwrap();
    raw(
        &store,
        "UPDATE vms SET image = CAST(x'ff00fe' AS TEXT) WHERE id = $1",
        "id-a",
    )
    .await;
    raw(&store, "UPDATE vms SET cpus = 'many' WHERE id = $1", "id-b").await;
    store.insert_vm(&record("c")).await.unwrap();
    let list = store.list_vms().await.unwrap();
    assert_eq!(
        list.vms.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["c"]
    );
    let bad: Vec<_> = list.unreadable.iter().map(|u| u.id.as_str()).collect();
    assert_eq!(bad, ["id-a", "id-b"]);
    assert_eq!(
        list.unreadable[0].error.to_string(),
        "the stored VM \"id-a\" cannot be read: error occurred while decoding: invalid utf-8 sequence of 1 bytes from index 0"
    );
    assert!(matches!(
        &list.unreadable[1].error,
        StoreError::Unreadable { column: "cpus", .. }
    ));
    store
        .mark_error("id-a", "recovery_failed", "unreadable")
        .await
        .unwrap();
    assert_eq!(raw_state(&store, "id-a").await.0, "error");
    let list = store.list_vms().await.unwrap();
    let a = &list.unreadable[0];
    assert_eq!(
        (a.id.as_str(), a.name.as_deref(), a.state),
        ("id-a", Some("a"), Some(VmState::Error))
    );
    store.close().await;
}

/// A PostgreSQL server of the test's own: `initdb` on a temp dir, `postgres` on a free loopback
/// port with its socket in that dir, run as the `postgres` user when the test runs as root
/// (PostgreSQL refuses root). Dropping it stops the server by its PID and removes the dir.
struct Postgres {
    child: Child,
    port: u16,
    socket: PathBuf,
    next: AtomicU32,
    log: PathBuf,
    // Last: removed after the server stopped.
    _dir: tempfile::TempDir,
}

impl Postgres {
    async fn start() -> Postgres {
        let bin = postgres_bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let user = run_as();
        // The server's user must reach its data and socket dirs inside ours.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = dir.path().join("data");
        let socket = dir.path().join("socket");
        for d in [&data, &socket] {
            std::fs::create_dir(d).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
            }
        }
        let log = dir.path().join("postgres.log");
        let initdb = as_user(Command::new(bin.join("initdb")), user, dir.path())
            .args(["-D", &data.display().to_string()])
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"])
            .args(["--no-sync", "--no-instructions"])
            .output()
            .unwrap();
        assert!(
            initdb.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&initdb.stdout),
            String::from_utf8_lossy(&initdb.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let out = std::fs::File::create(&log).unwrap();
        let child = as_user(Command::new(bin.join("postgres")), user, dir.path())
            .args(["-D", &data.display().to_string()])
            .args(["-p", &port.to_string(), "-h", "127.0.0.1"])
            .args(["-k", &socket.display().to_string()])
            // Durability is of no use to a test database.
            .args([
                "-F",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut pg = Postgres {
            child,
            port,
            socket,
            next: AtomicU32::new(0),
            log,
            _dir: dir,
        };
        pg.wait_ready().await;
        pg
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    async fn wait_ready(&mut self) {
        sqlx::any::install_default_drivers();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("postgres exited ({status}): {}", self.log_text());
            }
            match sqlx::AnyConnection::connect(&self.url("postgres")).await {
                Ok(c) => {
                    let _ = c.close().await;
                    return;
                }
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "postgres did not accept connections in 20 s: {e}\n{}",
                        self.log_text()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// A new, empty database; its URL.
    async fn fresh_database(&self) -> String {
        let name = format!("suite_{}", self.next.fetch_add(1, Ordering::Relaxed));
        let mut admin = sqlx::AnyConnection::connect(&self.url("postgres"))
            .await
            .unwrap();
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
        self.url(&name)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        // SIGINT is the fast shutdown: it ends client connections instead of waiting for them.
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has the server.
fn postgres_bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("postgres").is_file() && bin.join("initdb").is_file())
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "the store suite on PostgreSQL needs its server: no /usr/lib/postgresql/*/bin/postgres; \
             install Debian's `postgresql` package (scripts/install-deps.sh does)"
        )
    })
}

/// The user to run PostgreSQL as: `postgres` when the test runs as root (it refuses root),
/// else the test's own.
fn run_as() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres")
        .unwrap()
        .unwrap_or_else(|| {
            panic!("the store suite runs PostgreSQL as the `postgres` user, which does not exist; install Debian's `postgresql` package")
        });
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

fn as_user(mut cmd: Command, user: Option<(u32, u32)>, cwd: &Path) -> Command {
    if let Some((uid, gid)) = user {
        // std drops the supplementary groups when it changes the uid from root.
        cmd.uid(uid).gid(gid);
    }
    cmd.current_dir(cwd);
    cmd
}
