-- Placeholder: version 6 belongs to the OAuth authorization server's migration (issue 13,
-- another branch). Migrations must be numbered without gaps, so this branch keeps the number
-- with an empty one; merging drops this file for the real 0006.
SELECT 1;
