//! banger's wire protocol (DESIGN §4): JSON over a Unix stream socket, one request per connection.
