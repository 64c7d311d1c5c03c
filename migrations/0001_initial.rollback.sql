DROP TABLE outbox;
DROP TABLE moderation_results;
DROP TABLE advertisements;
DROP TABLE users;
