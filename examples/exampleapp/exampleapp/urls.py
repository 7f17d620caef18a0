"""The example app serves no pages: its work happens in Celery tasks."""

urlpatterns: list = []
