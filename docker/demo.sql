-- The demo table the compose setup exposes (runs once, when the database is created).
create table items (
    id    serial primary key,
    name  text not null,
    price numeric
);
insert into items (name, price) values ('apple', 10.5), ('pear', 7.25);
