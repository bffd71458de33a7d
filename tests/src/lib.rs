//! Helpers shared by Porthole's end-to-end tests.
