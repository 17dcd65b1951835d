//! The benches' data split (issue #3's bench, shared by the robustness and compression
//! benches so their figures are comparable): whole writers of a dataset with a clients file,
//! drawn with a seed into the server's labelled set, the server's unlabelled pool and the edge
//! clients (one client per writer); the test split is used whole.

use anyhow::{bail, Context, Result};
use coevo_coordinator::coevolve::{split_server_data, ServerData};
use coevo_coordinator::config::ServerDataConfig;
use coevo_models::data::distinct_clients;
use coevo_models::{DataShape, Dataset};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;

/// Flags shared by every bench: where the data is and how it is split.
#[derive(Clone, Debug, clap::Args)]
pub struct SplitArgs {
    /// Dataset directory with a clients file (IDX with train-clients.txt, or an image folder
    /// with train-clients.csv): writers are the unit of the split.
    #[arg(long, default_value = "../shared/data/femnist")]
    pub data: PathBuf,
    /// Writers whose labelled samples the server owns. Unless `--server-validation` is given,
    /// 20 % of these writers (2 of 10) are held out whole as the validation set both guards
    /// use: never frames of a writer the teacher trains on, which would be near-copies.
    #[arg(long, default_value_t = 10)]
    pub server_labelled: usize,
    /// Extra writers (drawn after the server's, before the clients) held out whole as the
    /// guards' validation set; 0 = hold out 20 % of the labelled writers instead.
    #[arg(long, default_value_t = 0)]
    pub server_validation: usize,
    /// Writers whose images form the server's unlabelled pool (labels never read).
    #[arg(long, default_value_t = 20)]
    pub server_unlabelled: usize,
    /// Writers that become edge clients (0 = all the remaining ones).
    #[arg(long, default_value_t = 75)]
    pub clients: usize,
    /// Seed of the writer draw, model initialisation and training order.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// The split, loaded.
pub struct BenchSplit {
    /// The server roles by writer id (what a coordinator config would say).
    pub roles: ServerDataConfig,
    pub server: ServerData,
    /// One (writer id, samples) per edge client.
    pub clients: Vec<(String, Dataset)>,
    /// Every training sample of every writer in the split: the upper bound's data.
    pub train_all: Dataset,
    pub test: Dataset,
    pub shape: DataShape,
}

impl BenchSplit {
    pub fn load(args: &SplitArgs) -> Result<BenchSplit> {
        let split = coevo_models::data::load_dir(&args.data)
            .with_context(|| format!("loading {}", args.data.display()))?;
        let Some(writer_of) = split.train.clients.as_ref() else {
            bail!(
                "{} has no clients file (train-clients.txt / train-clients.csv): the benches \
                 split by writer",
                args.data.display()
            );
        };
        let mut writers = distinct_clients(writer_of);
        let server = args.server_labelled + args.server_unlabelled + args.server_validation;
        let want = if args.clients == 0 {
            writers.len().saturating_sub(server)
        } else {
            args.clients
        };
        if args.server_labelled == 0 || server + want > writers.len() || want == 0 {
            bail!(
                "{} has {} writers; the split asks for {} labelled + {} unlabelled + {} validation \
                 + {} clients (at least 1 labelled and 1 client)",
                args.data.display(),
                writers.len(),
                args.server_labelled,
                args.server_unlabelled,
                args.server_validation,
                want
            );
        }
        writers.shuffle(&mut rand::rngs::StdRng::seed_from_u64(args.seed));
        let unlabelled_end = args.server_labelled + args.server_unlabelled;
        let roles = ServerDataConfig {
            labelled_clients: writers[..args.server_labelled].to_vec(),
            unlabelled_clients: writers[args.server_labelled..unlabelled_end].to_vec(),
            validation_clients: writers[unlabelled_end..server].to_vec(),
            validation_holdout: 0.2,
            ..ServerDataConfig::default()
        };
        let (server_data, _) = split_server_data(&split.train, &roles, args.seed)?;
        let mut client_ids = writers[server..server + want].to_vec();
        client_ids.sort();
        let mut rows: std::collections::HashMap<&str, Vec<usize>> = Default::default();
        for (i, w) in writer_of.iter().enumerate() {
            rows.entry(w.as_str()).or_default().push(i);
        }
        let mut clients = Vec::with_capacity(client_ids.len());
        let mut all_rows: Vec<usize> = Vec::new();
        for id in client_ids {
            coevo_protocol::topic::validate_id(&id)
                .with_context(|| format!("writer id {id:?} can't be an MQTT client id"))?;
            let r = rows.get(id.as_str()).cloned().unwrap_or_default();
            clients.push((id, split.train.subset(&r)));
        }
        for id in writers[..server + want].iter() {
            all_rows.extend(rows.get(id.as_str()).into_iter().flatten());
        }
        all_rows.sort_unstable();
        Ok(BenchSplit {
            roles,
            server: server_data,
            train_all: split.train.subset(&all_rows),
            clients,
            shape: split.train.shape,
            test: split.test,
        })
    }

    /// Another handle on the server data (no copy), for one more fleet run.
    pub fn server_data(&self) -> ServerData {
        ServerData {
            labelled: self.server.labelled.shallow_clone(),
            unlabelled: self.server.unlabelled.shallow_clone(),
            validation: self.server.validation.shallow_clone(),
        }
    }

    /// Another handle on the client data (no copy).
    pub fn client_data(&self) -> Vec<(String, Dataset)> {
        self.clients
            .iter()
            .map(|(id, d)| (id.clone(), d.shallow_clone()))
            .collect()
    }

    /// One line for logs and summaries.
    pub fn describe(&self) -> String {
        format!(
            "labelled {} / validation {} / pool {} / {} clients ({} samples) / test {}",
            self.server.labelled.len(),
            self.server.validation.len(),
            self.server.unlabelled.len(),
            self.clients.len(),
            self.clients.iter().map(|(_, d)| d.len()).sum::<usize>(),
            self.test.len()
        )
    }
}
