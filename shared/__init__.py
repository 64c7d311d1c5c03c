"""The small library every moderation function imports: config, errors, schemas, model, db, kafka."""
