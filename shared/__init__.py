"""The small library every moderation function imports: config, db, kafka, model, schemas."""
