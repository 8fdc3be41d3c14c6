//! The users store on SQLite and PostgreSQL: each change and its event in one transaction, and
//! sequences in commit order even with concurrent writers.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use mesh_testkit::{Database, databases};
use mesh_users::store::{self, Changes, Created, EventKind, Updated, User, UsersStore};

/// A users store on each database of [`databases`], with its data folder.
async fn stores(test: &str) -> Vec<(String, Arc<dyn UsersStore>, tempfile::TempDir)> {
    let mut list = Vec::new();
    for database in databases() {
        let data = tempfile::tempdir().expect("tempdir");
        list.push(match database {
            Database::Sqlite => {
                let sqlite = store::open(None, data.path()).await.expect("sqlite");
                ("sqlite".to_owned(), sqlite, data)
            }
            Database::Postgres(admin_url) => {
                let url = mesh_store::testing::fresh_database(&admin_url, "users", test).await;
                let pg = store::open(Some(&url), data.path())
                    .await
                    .expect("postgres");
                ("postgres".to_owned(), pg, data)
            }
        });
    }
    list
}

fn new_user(n: u32) -> User {
    User {
        id: format!("0190f5c6-0000-7000-8000-{n:012}"),
        email: format!("user{n}@example.com"),
        display_name: format!("User {n}"),
        bio: String::new(),
        create_time: 0,
        update_time: 0,
        version: 0,
    }
}

/// Create, idempotent retry, update, no-op update, conflict and delete each do what they say,
/// and exactly the changes leave events, in order, without e-mail.
#[tokio::test]
async fn changes_and_their_events() {
    for (name, store, _data) in stores("changes_and_their_events").await {
        let alice = new_user(1);
        let Created::New(created, first) = store
            .create(&alice, Some("req-1"), 1000)
            .await
            .expect("create")
        else {
            panic!("{name}: not created")
        };
        assert_eq!((created.version, created.create_time), (1, 1000));
        assert_eq!(first.kind, EventKind::Created);
        assert!(
            first.user.email.is_empty(),
            "{name}: events carry no e-mail"
        );

        for (request_id, same) in [(Some("req-1"), true), (Some("other"), false), (None, false)] {
            match store.create(&alice, request_id, 2000).await.expect("again") {
                Created::Exists { user, same_request } => {
                    assert_eq!(same_request, same, "{name}: {request_id:?}");
                    assert_eq!(user, created);
                }
                Created::New(..) => panic!("{name}: created twice"),
            }
        }

        let rename = Changes {
            display_name: Some("Alice".into()),
            bio: None,
        };
        let Updated::Changed(renamed, second) = store
            .update(&alice.id, &rename, 1, 3000)
            .await
            .expect("update")
        else {
            panic!("{name}: not updated")
        };
        assert_eq!(
            (
                renamed.version,
                renamed.display_name.as_str(),
                renamed.update_time
            ),
            (2, "Alice", 3000)
        );
        assert_eq!(second.kind, EventKind::Updated);
        assert!(second.sequence > first.sequence);

        assert_eq!(
            store
                .update(&alice.id, &rename, 0, 4000)
                .await
                .expect("no-op"),
            Updated::Unchanged(renamed.clone()),
            "{name}: a no-op changes no version"
        );
        assert_eq!(
            store
                .update(
                    &alice.id,
                    &Changes {
                        bio: Some("x".into()),
                        ..Changes::default()
                    },
                    1,
                    4000
                )
                .await
                .expect("conflict"),
            Updated::Conflict(2)
        );
        assert_eq!(
            store
                .update("missing", &rename, 0, 4000)
                .await
                .expect("missing"),
            Updated::NotFound
        );

        let deleted = store
            .delete(&alice.id, 5000)
            .await
            .expect("delete")
            .expect("existed");
        assert_eq!(deleted.kind, EventKind::Deleted);
        assert_eq!(
            deleted.user.version, 3,
            "{name}: last state with version + 1"
        );
        assert_eq!(deleted.user.display_name, "Alice");
        assert!(store.get(&alice.id).await.expect("get").is_none());
        assert!(
            store
                .delete(&alice.id, 6000)
                .await
                .expect("again")
                .is_none()
        );

        let log = store.events_after(0, 100).await.expect("log");
        let kinds: Vec<_> = log.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [EventKind::Created, EventKind::Updated, EventKind::Deleted],
            "{name}"
        );
        assert_eq!(store.last_sequence().await.expect("last"), deleted.sequence);
        assert_eq!(
            store
                .events_after(deleted.sequence, 100)
                .await
                .expect("tail"),
            []
        );
        // The stored log is erased behind the deletion; only the live feed shows the DELETED
        // event's last state, until its tail is pruned.
        assert!(
            log.iter()
                .all(|e| e.user.display_name.is_empty() && e.user.bio.is_empty()),
            "{name}: {log:?}"
        );
        let live = store.live_events_after(0, 100).await.expect("live");
        assert_eq!(
            live.last().map(|e| e.user.display_name.as_str()),
            Some("Alice")
        );
        assert_eq!(
            live[0].user.display_name, "",
            "{name}: earlier events stay erased"
        );
        assert_eq!(store.prune(5000 + 59_000, None).await.expect("prune"), 0);
        let live = store.live_events_after(0, 100).await.expect("live");
        assert_eq!(
            live.last().map(|e| e.user.display_name.as_str()),
            Some("Alice")
        );
        store.prune(5000 + 60_000, None).await.expect("prune");
        let live = store.live_events_after(0, 100).await.expect("live");
        assert_eq!(live.last().map(|e| e.user.display_name.as_str()), Some(""));
    }
}

/// Retention removes the events that occurred before its cutoff and says through which
/// sequence; later events stay.
#[tokio::test]
async fn retention_prunes_old_events() {
    for (name, store, _data) in stores("retention_prunes_old_events").await {
        let mut sequences = Vec::new();
        for (i, at) in [1000, 2000, 3000].into_iter().enumerate() {
            let user = User {
                id: format!("0190f5c6-0000-7000-8000-00000000000{i}"),
                email: format!("u{i}@example.com"),
                display_name: format!("U{i}"),
                bio: String::new(),
                create_time: 0,
                update_time: 0,
                version: 0,
            };
            match store.create(&user, None, at).await.expect("create") {
                Created::New(_, event) => sequences.push(event.sequence),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(store.pruned_through().await.expect("none yet"), 0);
        let through = store.prune(10_000, Some(2500)).await.expect("prune");
        assert_eq!(through, sequences[1], "{name}");
        assert_eq!(
            store.pruned_through().await.expect("recorded"),
            sequences[1]
        );
        let left = store.events_after(0, 100).await.expect("left");
        assert_eq!(
            left.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [sequences[2]]
        );
        // A cutoff before what was already pruned changes nothing.
        assert_eq!(
            store.prune(10_000, Some(1)).await.expect("again"),
            sequences[1]
        );
    }
}

/// Batch reads return what exists; listing pages by id.
#[tokio::test]
async fn batch_and_list() {
    for (name, store, _data) in stores("batch_and_list").await {
        for n in 0..5 {
            store
                .create(&new_user(n), None, 1000)
                .await
                .expect("create");
        }
        let ids: Vec<String> = [0, 2, 4, 9].iter().map(|n| new_user(*n).id).collect();
        let found: BTreeSet<_> = store
            .batch_get(&ids)
            .await
            .expect("batch")
            .into_iter()
            .map(|u| u.id)
            .collect();
        assert_eq!(found, ids[..3].iter().cloned().collect(), "{name}");
        let first = store.list(None, 2).await.expect("page 1");
        let second = store.list(Some(&first[1].id), 10).await.expect("page 2");
        let all: Vec<_> = first.iter().chain(&second).map(|u| u.id.clone()).collect();
        let expected: Vec<_> = (0..5).map(|n| new_user(n).id).collect();
        assert_eq!(all, expected, "{name}");
    }
}

/// Concurrent writers with a reader following the log: the reader, polling "after the last
/// sequence I saw", ends up with exactly the full log — no event ever appears behind one already
/// seen (which is what a sequence committed out of order would cause).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_commit_in_sequence_order() {
    for (name, store, _data) in stores("concurrent_writers_commit_in_sequence_order").await {
        const WRITERS: u32 = 6;
        const PER_WRITER: u32 = 25;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..PER_WRITER {
                        let user = new_user(w * 1000 + i);
                        store.create(&user, None, 1).await.expect("create");
                        let bio = Changes {
                            bio: Some(format!("bio {i}")),
                            ..Changes::default()
                        };
                        store.update(&user.id, &bio, 0, 2).await.expect("update");
                    }
                })
            })
            .collect();

        let reader = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut last = 0;
                let total = (WRITERS * PER_WRITER * 2) as usize;
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while seen.len() < total && std::time::Instant::now() < deadline {
                    for event in store.events_after(last, 50).await.expect("poll") {
                        assert!(event.sequence > last);
                        last = event.sequence;
                        seen.push(event.sequence);
                    }
                    tokio::task::yield_now().await;
                }
                seen
            })
        };
        for writer in writers {
            writer.await.expect("writer");
        }
        let seen = reader.await.expect("reader");
        let full: Vec<i64> = store
            .events_after(0, 10_000)
            .await
            .expect("log")
            .iter()
            .map(|e| e.sequence)
            .collect();
        assert_eq!(full.len(), (WRITERS * PER_WRITER * 2) as usize, "{name}");
        assert_eq!(
            seen, full,
            "{name}: the follower missed or reordered events"
        );
        assert!(
            full.windows(2).all(|w| w[0] < w[1]),
            "{name}: not strictly increasing"
        );
    }
}
