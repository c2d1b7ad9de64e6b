"""Learning core: torch and numpy only (never imports rclpy or robosuite)."""
