//! EHR connections as the store keeps them: where the EHR is, how the gateway authenticates to
//! it (sealed), when it is pulled and the pull's watermark. The SQL is written once, in
//! [`shared_connection_sql!`], and expanded in each backend's module.
//!
//! The store never sees a secret in clear: the credential and the webhook secret arrive sealed
//! (AES-256-GCM envelopes whose AAD names the column and the row id), and leave sealed.
//! Connections are administered by the operator (CLI, internal API as a practice admin), so
//! these queries run on the owner's pool, each filtered by practice where a practice asks.

use async_trait::async_trait;

use super::StoreError;
use crate::domain::ResourceId;

/// A connection to create. The id is chosen by the caller: it is part of the sealed secrets' AAD.
#[derive(Debug, Clone)]
pub struct NewConnection {
    pub id: String,
    pub practice_id: ResourceId,
    pub vendor: String,
    pub base_url: String,
    pub client_id: String,
    pub token_url: Option<String>,
    pub credential: Vec<u8>,
    pub scopes: Option<String>,
    /// Vendor settings, a JSON object.
    pub settings: String,
    pub schedule: String,
    pub webhook_secret: Option<Vec<u8>>,
}

/// A connection as stored.
#[derive(Clone)]
pub struct StoredConnection {
    pub id: String,
    pub practice_id: ResourceId,
    pub vendor: String,
    pub base_url: String,
    pub client_id: String,
    pub token_url: Option<String>,
    pub credential: Option<Vec<u8>>,
    pub scopes: Option<String>,
    pub settings: String,
    pub schedule: String,
    pub webhook_secret: Option<Vec<u8>>,
    pub watermark: Option<String>,
    pub active: bool,
    pub created_at: time::OffsetDateTime,
}

impl std::fmt::Debug for StoredConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredConnection")
            .field("id", &self.id)
            .field("practice_id", &self.practice_id)
            .field("vendor", &self.vendor)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

#[async_trait]
pub trait ConnectionStore: Send + Sync {
    async fn create_connection(&self, new: &NewConnection) -> Result<StoredConnection, StoreError>;
    async fn get_connection(&self, id: &str) -> Result<StoredConnection, StoreError>;
    /// Every connection, or one practice's, oldest first.
    async fn list_connections(
        &self,
        practice: Option<&ResourceId>,
    ) -> Result<Vec<StoredConnection>, StoreError>;
}

pub(crate) const CONNECTION_COLUMNS: &str = "id, practice_id, vendor, base_url, client_id, \
    token_url, credential, scopes, settings, schedule, webhook_secret, watermark, status, created_at";

macro_rules! shared_connection_sql {
    ($store:ty, $db:ty, $row:ty) => {
        fn connection_from(row: &$row) -> Result<$crate::store::StoredConnection, sqlx::Error> {
            use sqlx::Row;
            let status: String = row.try_get("status")?;
            Ok($crate::store::StoredConnection {
                id: row.try_get("id")?,
                practice_id: $crate::domain::ResourceId::from_trusted(row.try_get("practice_id")?),
                vendor: row.try_get("vendor")?,
                base_url: row.try_get("base_url")?,
                client_id: row.try_get("client_id")?,
                token_url: row.try_get("token_url")?,
                credential: row.try_get("credential")?,
                scopes: row.try_get("scopes")?,
                settings: row.try_get("settings")?,
                schedule: row.try_get("schedule")?,
                webhook_secret: row.try_get("webhook_secret")?,
                watermark: row.try_get("watermark")?,
                active: status == "active",
                created_at: row.try_get("created_at")?,
            })
        }

        #[async_trait::async_trait]
        impl $crate::store::ConnectionStore for $store {
            async fn create_connection(
                &self,
                new: &$crate::store::NewConnection,
            ) -> Result<$crate::store::StoredConnection, $crate::store::StoreError> {
                let now = $crate::store::now();
                sqlx::query(
                    "INSERT INTO ehr_connections (id, practice_id, vendor, base_url, client_id,
                         token_url, credential, scopes, settings, schedule, webhook_secret,
                         status, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'active', $12, $12)",
                )
                .bind(&new.id)
                .bind(new.practice_id.as_str())
                .bind(&new.vendor)
                .bind(&new.base_url)
                .bind(&new.client_id)
                .bind(&new.token_url)
                .bind(&new.credential)
                .bind(&new.scopes)
                .bind(&new.settings)
                .bind(&new.schedule)
                .bind(&new.webhook_secret)
                .bind(now)
                .execute(&self.pool)
                .await?;
                self.get_connection(&new.id).await
            }

            async fn get_connection(
                &self,
                id: &str,
            ) -> Result<$crate::store::StoredConnection, $crate::store::StoreError> {
                let row = sqlx::query(&format!(
                    "SELECT {} FROM ehr_connections WHERE id = $1",
                    $crate::store::CONNECTION_COLUMNS
                ))
                .bind(id)
                .fetch_one(&self.pool)
                .await?;
                Ok(connection_from(&row)?)
            }

            async fn list_connections(
                &self,
                practice: Option<&$crate::domain::ResourceId>,
            ) -> Result<Vec<$crate::store::StoredConnection>, $crate::store::StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(format!(
                    "SELECT {} FROM ehr_connections",
                    $crate::store::CONNECTION_COLUMNS
                ));
                if let Some(practice) = practice {
                    q.push(" WHERE practice_id = ").push_bind(practice.as_str());
                }
                q.push(" ORDER BY created_at, id");
                let rows = q.build().fetch_all(&self.pool).await?;
                Ok(rows.iter().map(connection_from).collect::<Result<_, _>>()?)
            }
        }
    };
}
pub(crate) use shared_connection_sql;
