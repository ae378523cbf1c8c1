"""Physics of the PROVABGS SED model, pure JAX: units and parameter names, cosmology, dust,
star-formation and metallicity histories, the SSP grid, filters and photometry, and the model
that joins them (:class:`~sedflow_jax.sed.model.SEDModel`)."""
