//! Examples live beside this file as `[[example]]` targets.
