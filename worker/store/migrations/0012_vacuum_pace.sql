-- Vacuum at the pace of the hot path. Every task leaves two dead row versions in tasks (its
-- completion's old row, and the row itself once purged), some thousands a second from a worker
-- at its peak, and only a vacuum makes their space reusable. The server's defaults throttle
-- every vacuum (autovacuum_vacuum_cost_delay) and start one only once a fifth of a table is
-- dead: made for tables that change slowly, they let dead rows pile up beside the live ones of
-- a queue's table, which grew for a million tasks before it settled under retention (growth
-- benchmark). These tables are vacuumed unthrottled, whenever 2% of their rows are dead. A
-- server without autovacuum ignores both; an operator may still set others.
ALTER TABLE tasks SET (autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE task_logs SET (autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_scale_factor = 0.02);
ALTER TABLE purged_tasks SET (autovacuum_vacuum_cost_delay = 0, autovacuum_vacuum_scale_factor = 0.02);
