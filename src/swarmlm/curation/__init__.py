"""Human-feedback curation: tasks, annotations, quality consensus, agreement and reputation."""
