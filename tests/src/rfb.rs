//! The RFB client the tests use is the product's own (`porthole_api::rfb`, also behind the GUI's console).

pub use porthole_api::rfb::*;
