//! The AMQP front end from outside: an independent client (lapin), a raw client
//! that sends what no client library would, and the frame decoder under mutation.

mod bad_input;
mod flow;
mod fuzz;
mod lapin_smoke;
mod raw;
