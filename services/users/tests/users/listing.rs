//! ListUsers: paging by id while users come and go, forged page tokens, restarts.

use std::collections::BTreeSet;

use mesh_proto::users::v1::{
    DeleteUserRequest, ListUsersRequest, user_service_client::UserServiceClient,
};
use mesh_testkit::{Database, assert_code_contains, bearer, databases};
use tonic::{Code, transport::Channel};

use crate::{Caller, create, start, start_with, user, user_with_id};

/// One page of ListUsers: its ids and the next page token.
async fn list_page(
    client: &mut UserServiceClient<Channel>,
    token: &str,
    page_size: i32,
    page_token: &str,
) -> (Vec<String>, String) {
    let page = client
        .list_users(bearer(
            token,
            ListUsersRequest {
                page_size,
                page_token: page_token.into(),
            },
        ))
        .await
        .expect("list")
        .into_inner();
    (
        page.users.into_iter().map(|u| u.id).collect(),
        page.next_page_token,
    )
}

/// ListUsers pages through everyone by id, and resumes correctly while users are added and
/// deleted between pages: nothing is repeated, nothing that existed throughout is missed,
/// nothing deleted before its page shows up. Forged or altered tokens and negative sizes are
/// INVALID_ARGUMENT; 0 means 50; the last page has no next token.
#[tokio::test]
async fn list_users_pages_stay_correct_under_changes() {
    for database in databases() {
        let mesh = start(database).await;
        let mut client = mesh.users_client();
        // Ids spread over the key space, so later inserts land both before and after the
        // position of the listing.
        let id_of = |n: u32| {
            format!(
                "{:08x}-0000-7000-8000-000000000000",
                n.wrapping_mul(0x9e37_79b9)
            )
        };
        let mut callers = Vec::new();
        for n in 0..60 {
            let caller = user_with_id(&mesh, &id_of(n));
            create(&mesh, &caller, &format!("User {n}")).await;
            callers.push(caller);
        }
        let reader = &callers[0].token;

        let (first, mut token) = list_page(&mut client, reader, 20, "").await;
        assert_eq!(first.len(), 20);
        let position = first.last().expect("page").clone();
        let mut seen = first.clone();

        // Between pages: delete two users not yet listed and one already listed, add users
        // before and after the position.
        let mut unlisted: Vec<&Caller> = callers.iter().filter(|c| c.id > position).collect();
        unlisted.sort_by(|a, b| a.id.cmp(&b.id));
        let deleted = [unlisted[0].clone(), unlisted[unlisted.len() - 1].clone()];
        let listed_then_deleted = callers
            .iter()
            .find(|c| c.id == first[3])
            .expect("listed")
            .clone();
        for caller in deleted.iter().chain([&listed_then_deleted]) {
            client
                .delete_user(bearer(
                    &caller.token,
                    DeleteUserRequest {
                        id: caller.id.clone(),
                    },
                ))
                .await
                .expect("delete");
        }
        let mut added = Vec::new();
        for n in 100..120 {
            let caller = user_with_id(&mesh, &id_of(n));
            create(&mesh, &caller, &format!("User {n}")).await;
            added.push(caller.id);
        }

        // The rest, with a page size that changes between pages.
        for size in [7, 0, 1000].into_iter().cycle() {
            if token.is_empty() {
                break;
            }
            let (ids, next) = list_page(&mut client, reader, size, &token).await;
            seen.extend(ids);
            token = next;
        }
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "strictly by id, no repeats: {seen:?}"
        );
        let seen_set: BTreeSet<&String> = seen.iter().collect();
        for caller in &callers {
            let deleted_unlisted = deleted.iter().any(|d| d.id == caller.id);
            assert_eq!(
                seen_set.contains(&caller.id),
                !deleted_unlisted,
                "{} (deleted before its page: {deleted_unlisted})",
                caller.id
            );
        }
        for id in &added {
            // Inserted behind the position: not seen; ahead of it: seen.
            assert_eq!(seen_set.contains(id), *id > position, "{id}");
        }

        let (default_page, next) = list_page(&mut client, reader, 0, "").await;
        assert_eq!(default_page.len(), 50);
        assert!(!next.is_empty());
        let (everyone, last) = list_page(&mut client, reader, 5000, "").await;
        assert_eq!(everyone.len(), 60 - 3 + 20);
        assert!(last.is_empty(), "the last page has no next token");

        assert_code_contains(
            client
                .list_users(bearer(
                    reader,
                    ListUsersRequest {
                        page_size: -1,
                        page_token: String::new(),
                    },
                ))
                .await,
            Code::InvalidArgument,
            "page_size",
        );
        let mut altered = next.clone();
        let flipped = if altered.ends_with('A') { 'B' } else { 'A' };
        altered.pop();
        altered.push(flipped);
        let forged = format!(
            "{}.{}",
            base64_url(&format!("v1.{}", id_of(5))),
            next.split_once('.').map(|(_, mac)| mac).unwrap_or_default()
        );
        for bad in [altered, forged, "garbage".into(), "a.b".into()] {
            assert_code_contains(
                client
                    .list_users(bearer(
                        reader,
                        ListUsersRequest {
                            page_size: 10,
                            page_token: bad,
                        },
                    ))
                    .await,
                Code::InvalidArgument,
                "page_token",
            );
        }
        mesh.stop().await;
    }
}

fn base64_url(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

/// A page token stays valid across a restart: the key lives in the database.
#[tokio::test]
async fn page_tokens_survive_a_restart() {
    let data = tempfile::tempdir().expect("data");
    let db = format!("sqlite://{}", data.path().join("shared.db").display());
    let token = {
        let mesh = start_with(Database::Sqlite, {
            let db = db.clone();
            move |c| c.database_url = Some(db.as_str().into())
        })
        .await;
        let mut callers = Vec::new();
        for _ in 0..3 {
            let caller = user(&mesh);
            create(&mesh, &caller, "U").await;
            callers.push(caller);
        }
        let (_, token) = list_page(&mut mesh.users_client(), &callers[0].token, 1, "").await;
        mesh.stop().await;
        token
    };
    let mesh = start_with(Database::Sqlite, move |c| {
        c.database_url = Some(db.as_str().into())
    })
    .await;
    let reader = user(&mesh);
    let (ids, _) = list_page(&mut mesh.users_client(), &reader.token, 10, &token).await;
    assert_eq!(ids.len(), 2, "resumed after the first of three");
    mesh.stop().await;
}
