// `sqlx::migrate!` embeds `migrations/` at compile time; without this, adding a migration file
// (and changing nothing else in this crate) would leave the old set embedded.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
