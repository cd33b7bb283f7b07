//! The download side of the repository: where a package's bytes are (this node's cache,
//! fetched from the shared database in cluster mode), signed download links and their check,
//! and the `upgrade` push's data.

use super::*;

impl FirmwareRepo {
    /// Path of a package's bytes in this node's blob directory (cluster mode: maybe not
    /// cached yet, see [`local_blob`](Self::local_blob)).
    pub fn blob_path(&self, package: &FirmwarePackage) -> PathBuf {
        self.blob_dir.join(&package.sha256)
    }

    /// The package a download names: this node's index on a single node; in cluster mode the
    /// metadata of record (a node that does not drive the engines does not keep its index
    /// current), or this node's index while the shared database cannot be read.
    pub async fn download_package(
        &self,
        firmware_id: &str,
    ) -> Result<Option<FirmwarePackage>, FirmwareError> {
        let Some(shared) = &self.shared else {
            return Ok(self.get(firmware_id));
        };
        let body = match shared.package(firmware_id).await {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(None),
            Err(e) => {
                let known = self.get(firmware_id);
                tracing::warn!(firmware_id = %firmware_id, error = %e, from_index = known.is_some(), "cannot read firmware metadata of record");
                return match known {
                    Some(package) => Ok(Some(package)),
                    None => Err(e.into()),
                };
            }
        };
        let package: FirmwarePackage =
            serde_json::from_str(&body).map_err(|e| FirmwareError::Corrupt {
                id: firmware_id.to_owned(),
                message: e.to_string(),
            })?;
        Ok(Some(package))
    }

    /// The file holding `package`'s bytes on this node. Cluster mode: fetched from the shared
    /// copy into the blob directory first when it is not there (its SHA-256 and size checked
    /// before it is installed; concurrent calls for one blob fetch it once). Single node: the
    /// path, whether or not the file exists.
    pub async fn local_blob(&self, package: &FirmwarePackage) -> Result<PathBuf, FirmwareError> {
        if !blob::is_blob_name(&package.sha256) {
            return Err(FirmwareError::Corrupt {
                id: package.firmware_id.clone(),
                message: format!("{:?} is not a SHA-256", package.sha256),
            });
        }
        let path = self.blob_path(package);
        let Some(shared) = &self.shared else {
            return Ok(path);
        };
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let gate = self
            .fetching
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(package.sha256.clone())
            .or_default()
            .clone();
        let fetched = {
            let _held = gate.lock().await;
            if tokio::fs::try_exists(&path).await.unwrap_or(false) {
                Ok(path)
            } else {
                self.fetch(shared.as_ref(), package).await
            }
        };
        let mut gates = self.fetching.lock().unwrap_or_else(PoisonError::into_inner);
        if gates
            .get(&package.sha256)
            .is_some_and(|g| Arc::ptr_eq(g, &gate))
        {
            gates.remove(&package.sha256);
        }
        fetched
    }

    /// Copies `package`'s shared bytes into the blob directory (a temp file, checked, then
    /// renamed onto its address).
    async fn fetch(
        &self,
        shared: &dyn SharedFirmware,
        package: &FirmwarePackage,
    ) -> Result<PathBuf, FirmwareError> {
        let sha256 = &package.sha256;
        let corrupt = |message: String| {
            FirmwareError::Blob(BlobError::Corrupt {
                sha256: sha256.clone(),
                message,
            })
        };
        // At most the package's size: more is corruption, refused while streaming.
        let mut writer = BlobWriter::create(&self.blob_dir, package.size).await?;
        match shared.fetch(sha256, &mut writer).await {
            Ok(()) => {}
            Err(BlobError::TooLarge { max }) => {
                return Err(corrupt(format!("more than the package's {max} bytes")))
            }
            Err(e) => return Err(e.into()),
        }
        let staged = writer.finish().await?;
        if staged.size != package.size {
            return Err(corrupt(format!(
                "{} bytes instead of {}",
                staged.size, package.size
            )));
        }
        if &staged.sha256 != sha256 {
            return Err(corrupt(format!("their SHA-256 is {}", staged.sha256)));
        }
        let installed = self.install(staged).await?;
        tracing::info!(sha256 = %sha256, size = package.size, "firmware fetched from the shared database into the local cache");
        Ok(installed)
    }

    /// The signed URL and its `expires` (unix seconds).
    fn signed_url(&self, firmware_id: &str, ttl: Duration) -> (String, u64) {
        // Round up so a ttl under a second still yields a usable link.
        let ttl_secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let expires = now_secs().saturating_add(ttl_secs);
        let token = self.key.sign(firmware_id, expires);
        let url = format!(
            "{}/firmware/{firmware_id}/download?expires={expires}&token={token}",
            self.public_url
        );
        (url, expires)
    }

    /// Absolute URL with an expiring signed token:
    /// `{public_url}/firmware/{id}/download?expires={unix s}&token={hex hmac}`.
    pub fn download_url(&self, firmware_id: &str, ttl: Duration) -> Option<String> {
        self.download_link(firmware_id, ttl).map(|(url, _)| url)
    }

    /// [`download_url`](Self::download_url) with its expiry (unix seconds).
    pub fn download_link(&self, firmware_id: &str, ttl: Duration) -> Option<(String, u64)> {
        self.read()
            .packages
            .contains_key(firmware_id)
            .then(|| self.signed_url(firmware_id, ttl))
    }

    /// Checks the `expires`/`token` query values of a download of `firmware_id` now.
    pub fn verify_download(
        &self,
        firmware_id: &str,
        expires: Option<&str>,
        token: Option<&str>,
    ) -> Result<(), TokenError> {
        self.key.verify(firmware_id, expires, token, now_secs())
    }

    /// The `data` of an upgrade push / firmware-get reply for this package (url valid for `ttl`).
    pub fn upgrade_data(&self, package: &FirmwarePackage, ttl: Duration) -> UpgradeData {
        UpgradeData {
            size: package.size,
            version: package.version.clone(),
            url: self.signed_url(&package.firmware_id, ttl).0,
            sign_method: package.sign_method,
            sign: package.sign.clone(),
            md5: package.md5.clone(),
            module: package.module.clone(),
            ext_data: None,
        }
    }
}
