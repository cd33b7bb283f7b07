//! The dashboard: devices total/online/offline and the version distribution per product,
//! and the running OTA jobs and migrations with their progress.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use maud::{html, Markup};

use super::view::{self, Nav};
use super::{Console, Sess};
use crate::migration::engine::TaskFilter;
use crate::migration::model::{SummaryStatus, TaskDetails};
use crate::ota::engine::JobFilter;
use crate::ota::model::{JobStatus, JobView};
use crate::registry::{DeviceFilter, Page, Product};

/// Products shown on the dashboard (the products page pages through all of them).
const PRODUCTS_SHOWN: u32 = 50;
/// Versions drawn per product; the rest are summed as "others".
const TOP_VERSIONS: usize = 5;
/// The module whose versions the dashboard charts.
const MODULE: &str = "default";

/// How often an open dashboard asks for its numbers again.
const POLL: &str = "every 5s";

pub(super) async fn page(State(c): State<Console>, session: Sess) -> Response {
    view::respond(
        StatusCode::OK,
        view::page("Dashboard", Nav::Dashboard, Some(&session), live_block(&c)),
    )
}

/// `GET /console/dashboard/live`: the dashboard's block alone, for its own polling.
pub(super) async fn live(State(c): State<Console>, _session: Sess) -> Response {
    view::respond(StatusCode::OK, live_block(&c))
}

/// Everything the dashboard shows, polling itself. Its links carry ids, so htmx gives the
/// keyboard focus back to the same link after a swap.
fn live_block(c: &Console) -> Markup {
    let registry = &c.api_state.registry;
    let products = registry.list_products(Page::new(1, PRODUCTS_SHOWN).unwrap_or_default());
    let online_filter = DeviceFilter {
        online: Some(true),
        ..Default::default()
    };
    let mut total = 0u64;
    let mut online = 0u64;
    let mut cards: Vec<Markup> = Vec::new();
    for p in &products.items {
        let on = registry
            .list_devices(
                &p.product_key,
                &online_filter,
                Page::new(1, 1).unwrap_or_default(),
            )
            .map(|page| page.total)
            .unwrap_or(0);
        total += p.device_count;
        online += on;
        cards.push(product_card(p, on, version_rows(c, &p.product_key)));
    }
    let jobs = running_jobs(c);
    let migrations = c
        .api_state
        .migration
        .list(
            &TaskFilter::default(),
            Page::new(1, 100).unwrap_or_default(),
        )
        .items
        .into_iter()
        .filter(|t| t.status == SummaryStatus::Migrating)
        .collect::<Vec<_>>();
    html! {
        div #dashboard hx-get="/console/dashboard/live" hx-trigger=(POLL) hx-swap="outerHTML" {
        section.card aria-label="Fleet" {
            div.kpis {
                div.kpi { strong #devices-total { (total) } "devices" }
                div.kpi { strong.online #devices-online { (online) } "online" }
                div.kpi { strong #devices-offline { (total.saturating_sub(online)) } "offline" }
                div.kpi { strong { (products.total) } "products" }
            }
        }
        h2 { "Running OTA jobs" }
        (jobs_table(&jobs))
        h2 { "Running migrations" }
        (migrations_table(&migrations))
        h2 { "Products" }
        @if cards.is_empty() {
            p { "No products yet. " a #d-create-product href="/console/products" { "Create one" } }
        }
        div.grid { @for card in cards { (card) } }
        @if products.total > u64::from(PRODUCTS_SHOWN) {
            p.small { "The first " (PRODUCTS_SHOWN) " products; " a #d-all-products href="/console/products" { "all products" } }
        }
        }
    }
}

/// The rows of a product's version chart: the top versions of [`MODULE`], the rest summed,
/// and the devices that reported none.
fn version_rows(c: &Console, product_key: &str) -> Option<Vec<(String, u64)>> {
    c.api_state
        .ota
        .version_distribution(product_key, MODULE)
        .ok()
        .map(|d| {
            let mut rows: Vec<(String, u64)> = d
                .versions
                .iter()
                .take(TOP_VERSIONS)
                .map(|v| (v.version.clone(), v.devices))
                .collect();
            let others: u64 = d
                .versions
                .iter()
                .skip(TOP_VERSIONS)
                .map(|v| v.devices)
                .sum();
            if others > 0 {
                rows.push(("others".into(), others));
            }
            if d.unknown > 0 {
                rows.push(("not reported".into(), d.unknown));
            }
            rows
        })
}

/// A product's card: its device counts and version chart.
fn product_card(p: &Product, on: u64, chart: Option<Vec<(String, u64)>>) -> Markup {
    html! {
        section.card aria-labelledby=(format!("p-{}", p.product_key)) {
            h3 id=(format!("p-{}", p.product_key)) {
                a id=(format!("dp-{}", p.product_key)) href=(format!("/console/products/{}", view::enc(&p.product_key))) { (p.name) }
                " " span.small { (p.product_key) }
            }
            div.kpis {
                div.kpi { strong { (p.device_count) } "devices" }
                div.kpi { strong.online { (on) } "online" }
                div.kpi { strong { (p.device_count.saturating_sub(on)) } "offline" }
            }
            @if let Some(rows) = chart.filter(|r| !r.is_empty()) {
                (view::bar_chart(&format!("Versions of module {MODULE} in {}", p.name), &rows))
            }
        }
    }
}

/// The running jobs' table, or a line saying there is none.
fn jobs_table(jobs: &[JobView]) -> Markup {
    html! {
        @if jobs.is_empty() {
            p.small { "No job is running. " a #d-jobs href="/console/ota" { "Jobs" } }
        } @else {
            div.table-wrap { table {
                thead { tr { th { "Job" } th { "Product" } th { "Target" } th { "Status" } th { "Progress" } } }
                tbody {
                    @for j in jobs {
                        @let c = &j.counters;
                        tr {
                            td { a id=(format!("dj-{}", j.job.job_id)) href=(format!("/console/ota/jobs/{}", j.job.job_id)) { (j.job.spec.name.as_deref().unwrap_or(&j.job.job_id)) } }
                            td { (j.job.product_key) }
                            td { (j.job.module) " → " (j.job.dest_version) }
                            td { (j.job.status.as_str()) }
                            td { (view::progress(c.succeeded + c.failed + c.canceled, c.total, "finished tasks")) }
                        }
                    }
                }
            } }
        }
    }
}

/// The migrations moving devices, or a line saying there is none.
fn migrations_table(migrations: &[TaskDetails]) -> Markup {
    html! {
        @if migrations.is_empty() {
            p.small { "No migration is moving devices. " a #d-migrations href="/console/migrations" { "Migrations" } }
        } @else {
            div.table-wrap { table {
                thead { tr { th { "Migration" } th { "Product" } th { "State" } th { "Progress" } } }
                tbody {
                    @for t in migrations {
                        tr {
                            td { a id=(format!("dm-{}", t.task_id)) href=(format!("/console/migrations/{}", t.task_id)) { (t.name) } }
                            td { (t.product_key) }
                            td { (t.state.as_str()) }
                            td { (view::progress(t.devices.migrated + t.devices.rolled_back + t.devices.failed, t.devices.total, "devices moved")) }
                        }
                    }
                }
            } }
        }
    }
}

/// IN_PROGRESS and PAUSED jobs, newest first.
fn running_jobs(c: &Console) -> Vec<JobView> {
    let ota = &c.api_state.ota;
    let mut jobs = Vec::new();
    for status in [JobStatus::InProgress, JobStatus::Paused] {
        let filter = JobFilter {
            status: Some(status),
            ..Default::default()
        };
        jobs.extend(
            ota.list_jobs(&filter, Page::new(1, 20).unwrap_or_default())
                .items,
        );
    }
    jobs.sort_by_key(|j| std::cmp::Reverse(j.job.created_at_ms));
    jobs
}
