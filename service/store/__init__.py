"""Storage: schema, repository, search index and query builder."""
