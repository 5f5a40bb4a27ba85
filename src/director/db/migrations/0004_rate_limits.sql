-- Placeholder on the studio branch only: hard/authedge adds the real 0004_rate_limits.sql
-- (the migrations must be numbered without gaps, and the Studio's is 0005). When both are
-- merged, keep hard/authedge's version of this file.
SELECT 1;
